"""Load a model bundle (``docs/bundle.md``) and run it with onnxruntime: torch-free.

>>> bundle = Bundle.load("bundles/toy")                       # doctest: +SKIP
>>> pixels = np.stack([bundle.preprocess(img) for img in images])  # doctest: +SKIP
>>> logits = bundle.logits(bundle.embed_images(pixels))     # doctest: +SKIP

Only stdlib, numpy, Pillow, onnxruntime, tokenizers and ftfy are imported here (never torch, open_clip,
``trainer`` or ``export``), so the serving image stays small.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serving.runtime.gpu import PreloadReport, cuda_versions, preload_gpu_libraries
from serving.runtime.manifest import _FIX, FileEntry, Manifest
from serving.runtime.manifest import FORMAT_VERSION as FORMAT_VERSION  # re-exported: the bundle's constants
from serving.runtime.manifest import MANIFEST as MANIFEST
from serving.runtime.manifest import BundleError as BundleError  # raised by Manifest.read as well
from serving.runtime.preprocess import PreprocessConfig, prepare_image, preprocess, preprocess_batch
from serving.runtime.tokenizer import ClipTokenizer

_logger = logging.getLogger(__name__)

IMAGE_ENCODER = "image_encoder.onnx"
TEXT_ENCODER = "text_encoder.onnx"
IMAGE_ENCODER_FP16 = "image_encoder.fp16.onnx"
TEXT_ENCODER_FP16 = "text_encoder.fp16.onnx"
# optional: the frozen text tower without the learned context (prompt-tuned bundles, exporter >= issue 11)
TEXT_ENCODER_HANDWRITTEN = "text_encoder_handwritten.onnx"
CLASS_EMBEDDINGS = "class_embeddings.npy"
CLASSES = "classes.json"
TOKENIZER = "tokenizer.json"
PRETOKENIZER = "pretokenizer.json"
REQUIRED_FILES = (IMAGE_ENCODER, TEXT_ENCODER, CLASS_EMBEDDINGS, CLASSES, TOKENIZER)
IMAGE_INPUT, TEXT_INPUT, OUTPUT = "pixels", "token_ids", "embeddings"

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DEFAULT_PROVIDERS = (CUDA, CPU)
PRECISIONS = ("auto", "fp32", "fp16")
# how a class name is embedded: through the learned context, the hand-written template without it, or the
# normalised mean of both
TEXT_PATHS = ("learned", "handwritten", "ensemble")
_GRAPH_OPT = ("disable", "basic", "extended", "all")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: str | os.PathLike[str]) -> FileEntry:
    """A manifest ``files`` entry: ``{"sha256": ..., "bytes": ...}``."""
    return FileEntry.of(path)


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse and sanity-check ``manifest.json`` of the bundle directory ``path`` (no file checks)."""
    return Manifest.read(path)


def verify_files(path: str | os.PathLike[str], manifest: Manifest, checksums: bool = True) -> None:
    """Every file the manifest lists exists with its size (and sha256 when ``checksums``); required ones listed."""
    root = Path(path)
    files = manifest.files
    for name in REQUIRED_FILES:
        if name not in files:
            raise BundleError(f"{root / MANIFEST} does not list the required file {name}: {_FIX}")
    for name, entry in files.items():
        if Path(name).name != name:
            raise BundleError(f"{root / MANIFEST} lists '{name}', which is not a plain file name: {_FIX}")
        fpath = root / name
        if not fpath.is_file():
            raise BundleError(f"bundle file {fpath} is missing: {_FIX}")
        size = fpath.stat().st_size
        if size != entry.bytes:
            raise BundleError(
                f"bundle file {fpath} has {size} bytes, the manifest says {entry.bytes}: "
                f"the file is truncated or was modified; {_FIX}"
            )
        if checksums:
            digest = sha256_file(fpath)
            if digest != entry.sha256:
                raise BundleError(
                    f"bundle file {fpath} has sha256 {digest[:16]}..., the manifest says "
                    f"{entry.sha256[:16]}...: the file is corrupt or was modified; {_FIX}"
                )


def session_options(
    intra_op_threads: int | None = None,
    inter_op_threads: int | None = None,
    graph_optimization: str = "all",
    execution_mode: str = "sequential",
    allow_spinning: bool = True,
) -> Any:
    """``onnxruntime.SessionOptions`` with the knobs that matter for serving.

    Args:
        intra_op_threads: threads inside one operator; None/0 = onnxruntime's default (all cores). With N
            server workers on one machine set it to about cores / N (oversubscription otherwise).
        inter_op_threads: threads across operators (only used with ``execution_mode="parallel"``).
        graph_optimization: ``disable`` | ``basic`` | ``extended`` | ``all``. fp16 graphs must never run
            on the CPU provider at ``all`` (onnxruntime 1.32 crashes at session creation); this runtime only
            loads fp16 files on CUDA.
        execution_mode: ``sequential`` | ``parallel``.
        allow_spinning: let idle intra-op threads busy-wait for the next operator (ORT's default). A server
            that decodes images on the same cores wants False: spinning threads take the cores from it.
    """
    import onnxruntime as ort

    if graph_optimization not in _GRAPH_OPT:
        raise ValueError(f"graph_optimization {graph_optimization!r} is not one of {_GRAPH_OPT}")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    opts = ort.SessionOptions()
    opts.graph_optimization_level = levels[graph_optimization]
    if intra_op_threads:
        opts.intra_op_num_threads = int(intra_op_threads)
    if inter_op_threads:
        opts.inter_op_num_threads = int(inter_op_threads)
    opts.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if execution_mode == "parallel" else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    if not allow_spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise here
    return opts


def resolve_providers(requested: Sequence[str] | None) -> list[str]:
    """The requested providers (default: CUDA then CPU) that this onnxruntime build offers, CPU last.

    ``get_available_providers()`` only says a provider is compiled in, not that its libraries load: the
    active provider is read from the session afterwards (:attr:`Bundle.provider`).
    """
    import onnxruntime as ort

    wanted = list(requested) if requested else list(DEFAULT_PROVIDERS)
    available = set(ort.get_available_providers())
    out = [p for p in wanted if p in available]
    if CPU not in out:
        out.append(CPU)  # always a working fallback
    dropped = [p for p in wanted if p not in available]
    if dropped:
        _logger.info("providers %s are not available in this onnxruntime build; using %s", dropped, out)
    return out


class Bundle:
    """A loaded bundle: two onnxruntime sessions, the class bank, the tokenizer and the preprocessing.

    Create with :meth:`load`. Attributes:

    - ``path``, ``manifest``: the directory and its ``manifest.json``
      (:class:`~serving.runtime.manifest.Manifest`);
    - ``class_names``, ``class_counts``, ``class_embeddings`` (float32 ``[C, E]``, L2-normalised);
    - ``logit_scale`` (already exp'd), ``logit_bias`` (None unless SigLIP-style), ``embed_dim``,
      ``image_size``, ``context_length``, ``template``, ``n_ctx``, ``placeholder``;
    - ``providers`` (as requested), ``provider`` (really active: ``session.get_providers()[0]`` of the image
      session), ``session_providers`` (both sessions), ``precision`` (``fp32``/``fp16``: the graph files
      in use);
    - ``preprocess_config`` and ``tokenizer``;
    - ``gpu`` (:class:`~serving.runtime.gpu.PreloadReport` of the CUDA library preload) and ``cuda``
      (``{"cuda", "cudnn"}`` versions in use; empty strings off CUDA);
    - ``handwritten_template`` (the hand-written prompt, e.g. ``"a photo of a {}."``; None for a tuned bundle
      exported before it was recorded) and ``text_paths`` (the :data:`TEXT_PATHS` this bundle can embed
      with: a tuned bundle needs ``text_encoder_handwritten.onnx`` for the hand-written ones).
    """

    def __init__(
        self,
        path: Path,
        manifest: Manifest,
        image_session: Any,
        text_session: Any,
        tokenizer: ClipTokenizer,
        class_names: list[str],
        class_counts: list[int],
        class_embeddings: np.ndarray,
        providers: list[str],
        precision: str,
        handwritten_session: Any = None,
    ) -> None:
        self.path = path
        self.manifest = manifest
        self._image = image_session
        self._text = text_session
        self.tokenizer = tokenizer
        self.class_names = class_names
        self.class_counts = class_counts
        self.class_embeddings = class_embeddings
        self.providers = providers
        self.precision = precision
        self.session_providers = {
            "image_encoder": str(image_session.get_providers()[0]),
            "text_encoder": str(text_session.get_providers()[0]),
        }
        self.provider = self.session_providers["image_encoder"]
        self.embed_dim = manifest.embed_dim
        self.context_length = manifest.context_length
        self.logit_scale = manifest.logit_scale
        self.logit_bias = manifest.logit_bias
        prompt = manifest.prompt
        self.template = prompt.template
        self.n_ctx = prompt.n_ctx
        self.placeholder = prompt.placeholder
        # a zero-shot bundle's own template is hand-written, and its text graph has no learned context
        hand = prompt.handwritten_template or (self.template if self.n_ctx == 0 else None)
        self.handwritten_template: str | None = hand
        self._handwritten = handwritten_session if self.n_ctx > 0 else text_session
        if handwritten_session is not None:
            self.session_providers["text_encoder_handwritten"] = str(handwritten_session.get_providers()[0])
        hand_ok = self._handwritten is not None and self.handwritten_template is not None
        self.text_paths: tuple[str, ...] = TEXT_PATHS if hand_ok else ("learned",)
        self.preprocess_config = PreprocessConfig.from_manifest(manifest.preprocess)
        self.image_size = self.preprocess_config.image_size
        # set by load(): what the CUDA library preload found, and the CUDA / cuDNN versions in use
        self.gpu = PreloadReport("not_requested")
        self.cuda: dict[str, str] = {"cuda": "", "cudnn": ""}

    # ------------------------------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        providers: list[str] | None = None,
        verify: bool = True,
        *,
        precision: str = "auto",
        intra_op_threads: int | None = None,
        graph_optimization: str = "all",
        allow_spinning: bool = True,
    ) -> Bundle:
        """Check and load a bundle directory.

        Args:
            path: the bundle directory.
            providers: onnxruntime providers in preference order; None = CUDA then CPU. Unavailable ones
                are dropped; what is really active is read back from the sessions.
            verify: check every file's sha256 (sizes and presence are always checked).
            precision: ``auto`` (fp16 files when the active provider is CUDA and the bundle has them, else
                fp32), ``fp32``, or ``fp16`` (refused unless CUDA is active).
            intra_op_threads: onnxruntime intra-op threads per session (None = its default).
            graph_optimization: see :func:`session_options` (fp32 graphs only; fp16 graphs on CUDA use it too).
            allow_spinning: see :func:`session_options` (the service turns it off).

        Raises:
            BundleError: missing/corrupt/modified files, a newer ``format_version``, inconsistent shapes,
                or a graph onnxruntime cannot load.
        """
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
        root = Path(path)
        manifest = read_manifest(root)
        verify_files(root, manifest, checksums=verify)
        files = manifest.files

        class_names, class_counts = _read_classes(root / CLASSES)
        emb = _read_embeddings(root / CLASS_EMBEDDINGS)
        embed_dim = manifest.embed_dim
        if emb.shape != (len(class_names), embed_dim):
            raise BundleError(
                f"{root / CLASS_EMBEDDINGS} has shape {emb.shape}, expected ({len(class_names)}, {embed_dim}) "
                f"from {CLASSES} and the manifest's embed_dim; {_FIX}"
            )
        tok_section = manifest.tokenizer
        pre_name = tok_section.pretokenizer_file
        if pre_name and pre_name not in files:
            raise BundleError(
                f"{root / MANIFEST} names pretokenizer_file {pre_name} but does not list it; {_FIX}"
            )
        try:
            tokenizer = ClipTokenizer(
                root / tok_section.file,
                root / pre_name if pre_name else None,
                context_length=manifest.context_length,
                sot_id=tok_section.sot_id,
                eot_id=tok_section.eot_id,
                pad_id=tok_section.pad_id,
            )
        except (OSError, ValueError, KeyError, Exception) as e:  # tokenizers raises plain Exception
            raise BundleError(f"the tokenizer files of {root} cannot be loaded ({e}); {_FIX}") from e

        requested = list(providers) if providers else list(DEFAULT_PROVIDERS)
        usable = resolve_providers(requested)
        # CUDA / cuDNN from the nvidia-* wheels must be in the process before the first session, or the
        # CUDA provider fails to load and ORT falls back to the CPU (the serving image has no torch)
        gpu = preload_gpu_libraries() if CUDA in usable else PreloadReport("not_requested")
        opts = session_options(
            intra_op_threads, graph_optimization=graph_optimization, allow_spinning=allow_spinning
        )
        text32 = _session(root / TEXT_ENCODER, usable, opts)
        active = str(text32.get_providers()[0])
        has_fp16 = IMAGE_ENCODER_FP16 in files and TEXT_ENCODER_FP16 in files
        if precision == "fp16" and not (active == CUDA and has_fp16):
            raise BundleError(
                f"precision fp16 needs the CUDA provider and fp16 files in {root}, but the active provider is "
                f"{active} and fp16 files are {'present' if has_fp16 else 'absent'}: use precision='auto' or "
                "'fp32', or export with --fp16 and serve on a GPU"
            )
        use_fp16 = active == CUDA and has_fp16 and precision in ("auto", "fp16")
        if use_fp16:
            text = _session(root / TEXT_ENCODER_FP16, usable, opts)
            image = _session(root / IMAGE_ENCODER_FP16, usable, opts)
        else:
            text = text32
            image = _session(root / IMAGE_ENCODER, usable, opts)
        _check_io(image, IMAGE_INPUT, root / (IMAGE_ENCODER_FP16 if use_fp16 else IMAGE_ENCODER))
        _check_io(text, TEXT_INPUT, root / (TEXT_ENCODER_FP16 if use_fp16 else TEXT_ENCODER))
        handwritten = None
        if TEXT_ENCODER_HANDWRITTEN in files:  # fp32 only: one text graph more, small next to the image's
            handwritten = _session(root / TEXT_ENCODER_HANDWRITTEN, usable, opts)
            _check_io(handwritten, TEXT_INPUT, root / TEXT_ENCODER_HANDWRITTEN)
        bundle = cls(
            root,
            manifest,
            image,
            text,
            tokenizer,
            class_names,
            class_counts,
            emb,
            requested,
            "fp16" if use_fp16 else "fp32",
            handwritten,
        )
        bundle.gpu = gpu
        bundle.cuda = cuda_versions(gpu.libraries) if bundle.provider == CUDA else {"cuda": "", "cudnn": ""}
        if providers and requested[0] != bundle.provider:
            _logger.warning(
                "bundle %s: requested provider %s but %s is active", root, requested[0], bundle.provider
            )
        _logger.info(
            "loaded bundle %s: %d classes, embed_dim %d, provider %s, %s",
            root,
            len(class_names),
            embed_dim,
            bundle.provider,
            bundle.precision,
        )
        return bundle

    session_options = staticmethod(session_options)

    # ------------------------------------------------------------------------------------------ text

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """Prompt texts -> token ids int64 ``[N, context_length]`` (open_clip's ids)."""
        return self.tokenizer(texts)

    def prompt_text(self, name: str, template: str | None = None) -> str:
        """The prompt text of a class name: ``template.format(name)`` (default: the bundle's template).

        For a prompt-tuned bundle (``n_ctx > 0``) the template must start with the ``n_ctx`` placeholder
        words (``"X X X X "``): the learned context overwrites those token positions inside the graph.
        """
        tpl = self.template if template is None else template
        if "{}" not in tpl:
            raise ValueError(f"prompt template {tpl!r} has no '{{}}' for the class name")
        if self.n_ctx > 0:
            prefix = " ".join([self.placeholder] * self.n_ctx) + " "
            if not tpl.startswith(prefix):
                raise ValueError(
                    f"this bundle has {self.n_ctx} learned context tokens: a template must start with "
                    f"{prefix!r} (got {tpl!r})"
                )
        return tpl.format(name)  # as PromptedCLIP.tokenize does

    def embed_token_ids(
        self, token_ids: np.ndarray, batch_size: int = 256, text_path: str = "learned"
    ) -> np.ndarray:
        """Token ids int64 ``[N, L]`` -> L2-normalised text embeddings float32 ``[N, E]``.

        ``text_path="learned"`` runs ``text_encoder.onnx``; ``"handwritten"`` the text tower without the
        learned context (``text_encoder_handwritten.onnx``; the one graph of a zero-shot bundle).
        """
        if text_path not in ("learned", "handwritten"):
            raise ValueError(
                f"token ids go through the 'learned' or the 'handwritten' graph, not {text_path!r}"
            )
        ids = np.asarray(token_ids)
        if ids.ndim != 2 or ids.shape[1] != self.context_length:
            raise ValueError(f"token_ids must be [N, {self.context_length}], got {ids.shape}")
        ids = ids.astype(np.int64, copy=False)
        session = self._text if text_path == "learned" else self._handwritten_session()
        return self._run(session, TEXT_INPUT, ids, batch_size)

    def embed_texts(
        self,
        names: list[str],
        template: str | None = None,
        batch_size: int = 256,
        text_path: str = "learned",
    ) -> np.ndarray:
        """Class names -> L2-normalised text embeddings float32 ``[N, E]``.

        ``text_path`` (one of :data:`TEXT_PATHS`):

        - ``learned``: each name in the prompt template (:meth:`prompt_text`; ``template`` overrides the
          bundle's) through ``text_encoder.onnx``; a prompt-tuned bundle applies its learned context;
        - ``handwritten``: ``handwritten_template.format(name)`` (``template`` overrides it) through the
          frozen text tower without the learned context: what zero-shot CLIP would give;
        - ``ensemble``: the L2-normalised mean of the two (bundle templates only).

        Encoded in batches of ``batch_size``. A path the bundle cannot embed with (``text_paths``) is a
        ``ValueError`` naming the fix.
        """
        if text_path not in TEXT_PATHS:
            raise ValueError(f"text_path {text_path!r} is not one of {TEXT_PATHS}")
        if isinstance(names, str):
            raise TypeError("names must be a list of strings, not a single string")
        if text_path == "ensemble":
            if template is not None:
                raise ValueError("text_path 'ensemble' uses the bundle's two templates: pass no template")
            self._handwritten_session()  # refuse before any work when the bundle cannot
            both = self.embed_texts(names, None, batch_size, "learned")
            both = both + self.embed_texts(names, None, batch_size, "handwritten")
            norms = np.linalg.norm(both, axis=1, keepdims=True)
            return np.ascontiguousarray(both / np.maximum(norms, 1e-12), dtype=np.float32)
        if not names:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        if text_path == "handwritten":
            self._handwritten_session()
            tpl = template if template is not None else self.handwritten_template
            assert tpl is not None  # _handwritten_session() refuses bundles without one
            if "{}" not in tpl:
                raise ValueError(f"prompt template {tpl!r} has no '{{}}' for the class name")
            return self.embed_token_ids(
                self.tokenize([tpl.format(n) for n in names]), batch_size, "handwritten"
            )
        texts = [self.prompt_text(n, template) for n in names]
        return self.embed_token_ids(self.tokenize(texts), batch_size)

    def _handwritten_session(self) -> Any:
        if "handwritten" not in self.text_paths:
            raise ValueError(
                f"bundle {self.path} has no hand-written text path ({TEXT_ENCODER_HANDWRITTEN} and "
                "prompt.handwritten_template): it was exported before they existed; re-export it with "
                "`python -m export`, or use text_path='learned'"
            )
        return self._handwritten

    # ------------------------------------------------------------------------------------------ images

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """A PIL image -> float32 ``[3, S, S]`` (open_clip's eval transform; see ``preprocess.py``)."""
        return preprocess(image, self.preprocess_config)

    def decode(self, data: bytes, *, reduced: bool = True) -> np.ndarray:
        """Encoded image bytes -> float32 ``[3, S, S]``, decoded as the service decodes uploads.

        ``reduced`` lets a large JPEG decode at reduced scale (:func:`prepare_image`); False decodes at full
        resolution. No safety checks: the service's ``serving.images.decode_image`` adds those.
        """
        image = prepare_image(Image.open(io.BytesIO(data)), self.preprocess_config if reduced else None)
        return self.preprocess(image)

    def preprocess_batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images -> float32 ``[N, 3, S, S]``."""
        return preprocess_batch(images, self.preprocess_config)

    def embed_images(self, pixels: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Preprocessed pixels float32 ``[N, 3, S, S]`` -> L2-normalised image embeddings float32 ``[N, E]``."""
        x = np.asarray(pixels)
        s = self.image_size
        if x.ndim != 4 or x.shape[1:] != (3, s, s):
            raise ValueError(f"pixels must be [N, 3, {s}, {s}], got {x.shape}")
        return self._run(self._image, IMAGE_INPUT, x.astype(np.float32, copy=False), batch_size)

    # ------------------------------------------------------------------------------------------ scores

    def logits(self, image_embeddings: np.ndarray, class_embeddings: np.ndarray | None = None) -> np.ndarray:
        """``logit_scale * cos + logit_bias`` float32 ``[N, C]`` (default classes: the bundle's)."""
        bank = self.class_embeddings if class_embeddings is None else class_embeddings
        out = self.logit_scale * (np.asarray(image_embeddings, np.float32) @ bank.T)
        if self.logit_bias is not None:
            out = out + self.logit_bias
        return out.astype(np.float32, copy=False)

    # ------------------------------------------------------------------------------------------ helpers

    def _run(self, session: Any, input_name: str, x: np.ndarray, batch_size: int) -> np.ndarray:
        if x.shape[0] == 0:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        step = max(1, int(batch_size))
        outs = [session.run([OUTPUT], {input_name: x[i : i + step]})[0] for i in range(0, x.shape[0], step)]
        out = np.concatenate(outs) if len(outs) > 1 else outs[0]
        return np.ascontiguousarray(out, dtype=np.float32)

    def __repr__(self) -> str:
        return (
            f"Bundle({str(self.path)!r}, classes={len(self.class_names)}, embed_dim={self.embed_dim}, "
            f"provider={self.provider!r}, precision={self.precision!r})"
        )


def _session(path: Path, providers: list[str], opts: Any) -> Any:
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise BundleError(
            f"onnxruntime cannot load {path} ({type(e).__name__}: {str(e)[:200]}); {_FIX}"
        ) from e


def _check_io(session: Any, input_name: str, path: Path) -> None:
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if inputs != [input_name] or OUTPUT not in outputs:
        raise BundleError(
            f"{path} has inputs {inputs} and outputs {outputs}, expected [{input_name!r}] -> {OUTPUT!r}; {_FIX}"
        )


def _read_classes(path: Path) -> tuple[list[str], list[int]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        names = [str(n) for n in data["names"]]
        counts = [int(c) for c in data.get("counts", [0] * len(names))]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path} is not a valid classes file ({e}); {_FIX}") from e
    if len(counts) != len(names):
        raise BundleError(f"{path} has {len(names)} names but {len(counts)} counts; {_FIX}")
    return names, counts


def _read_embeddings(path: Path) -> np.ndarray:
    try:
        emb = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} is not a valid .npy array ({e}); {_FIX}") from e
    if emb.ndim != 2 or not np.all(np.isfinite(emb)):
        raise BundleError(f"{path} must be a finite 2-D array, got shape {emb.shape}; {_FIX}")
    return np.ascontiguousarray(emb, dtype=np.float32)
