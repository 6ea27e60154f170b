"""The bundle manifest (``manifest.json``, ``docs/bundle.md``) as one frozen, typed record: :class:`Manifest`.

``export`` builds a :class:`Manifest` and writes it (:meth:`Manifest.write`); the runtime reads it
(:meth:`Manifest.read`) and uses its attributes. The JSON is what the exporter has always written (same
keys, same values, same order): :meth:`Manifest.to_dict` of a manifest read from disk gives the parsed JSON
back. Old bundles still load: sections and keys added over time get the defaults the readers used before,
and unknown keys are kept (``extra``) and written back unchanged. A manifest that cannot be used raises
:class:`BundleError` naming the file and the fix.

Stdlib only (never torch, open_clip, ``trainer`` or ``export``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_FIX = "re-export the bundle with `python -m export` (or copy it again)"

JSONValue: TypeAlias = Any  # whatever json.loads returns (the parity figures, an exporter's extra keys)
JSONObject: TypeAlias = dict[str, JSONValue]

# a field whose metadata carries OMIT is left out of the JSON while it is None (keys written only sometimes)
OMIT = {"omit_if_none": True}


class BundleError(Exception):
    """The bundle cannot be used; the message names the file and the fix."""


def _to_json(value: object) -> JSONValue:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


class Record:
    """Base of a dataclass written as JSON: :meth:`to_dict` gives the fields in order (an ``OMIT`` field only
    when set; nested records, lists and maps converted), then the unknown keys kept in ``extra`` if it has one.
    """

    def to_dict(self) -> JSONObject:
        out: JSONObject = {}
        for f in fields(self):  # type: ignore[arg-type]
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_if_none"):
                continue
            out[f.name] = _to_json(value)
        out.update(getattr(self, "extra", {}))
        return out


S = TypeVar("S")


def _known(cls: type) -> set[str]:
    return {f.name for f in fields(cls)} - {"extra"}


def _section(d: Mapping[str, JSONValue], key: str) -> Mapping[str, JSONValue]:
    value = d.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _extra(d: Mapping[str, JSONValue], cls: type) -> JSONObject:
    known = _known(cls)
    return {k: v for k, v in d.items() if k not in known}


def _opt_str(value: JSONValue) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True, kw_only=True)
class FileEntry(Record):
    """A ``files`` entry: the file's sha256 and size."""

    sha256: str
    bytes: int
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> FileEntry:
        return cls(sha256=str(d["sha256"]), bytes=int(d["bytes"]), extra=_extra(d, cls))

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileEntry:
        """The entry of the file at ``path`` (sha256 read in chunks)."""
        import hashlib

        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return cls(sha256=h.hexdigest(), bytes=os.path.getsize(path))


@dataclass(frozen=True, kw_only=True)
class ModelIdentity(Record):
    """``model``: which CLIP the graphs were exported from (keys after ``name`` None when not recorded)."""

    name: str | None = None  # readers show "unknown"
    pretrained: str | None = None
    config_path: str | None = None
    open_clip_version: str | None = None
    weights_sha256: str | None = None
    checkpoint_sha256: str | None = None
    activation: str | None = None  # the towers' MLP activation; None before flatprompt recorded it
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> ModelIdentity:
        return cls(
            name=_opt_str(d.get("name")),
            pretrained=_opt_str(d.get("pretrained")),
            config_path=_opt_str(d.get("config_path")),
            open_clip_version=_opt_str(d.get("open_clip_version")),
            weights_sha256=_opt_str(d.get("weights_sha256")),
            checkpoint_sha256=_opt_str(d.get("checkpoint_sha256")),
            activation=_opt_str(d.get("activation")),
            extra=_extra(d, cls),
        )


@dataclass(frozen=True, kw_only=True)
class SourceInfo(Record):
    """``source``: what was exported; ``extra`` holds the exporter's additional fields (epoch, data_kind...)."""

    kind: str | None = None  # "prompt_tuned" | "zero_shot"; readers show "unknown"
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> SourceInfo:
        return cls(
            kind=_opt_str(d.get("kind")),
            checkpoint=_opt_str(d.get("checkpoint")),
            checkpoint_sha256=_opt_str(d.get("checkpoint_sha256")),
            extra=_extra(d, cls),
        )


@dataclass(frozen=True, kw_only=True)
class OnnxInfo(Record):
    """``onnx``: how the graphs were written. ``exporter`` is one name, or one per graph when they differ."""

    opset: int | None = None
    exporter: str | dict[str, str] | None = None
    onnx_version: str | None = None
    onnxruntime_version: str | None = None
    torch_version: str | None = None
    graphs: dict[str, JSONObject] | None = field(default=None, metadata=OMIT)  # onnx.checker's summaries
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> OnnxInfo:
        opset = d.get("opset")
        return cls(
            opset=None if opset is None else int(opset),
            exporter=d.get("exporter"),
            onnx_version=_opt_str(d.get("onnx_version")),
            onnxruntime_version=_opt_str(d.get("onnxruntime_version")),
            torch_version=_opt_str(d.get("torch_version")),
            graphs=d.get("graphs"),
            extra=_extra(d, cls),
        )


@dataclass(frozen=True, kw_only=True)
class PromptInfo(Record):
    """``prompt``: the template, the learned context and the text paths (docs/bundle.md)."""

    template: str
    n_ctx: int = 0
    placeholder: str = "X"
    vpt_length: int | None = field(default=None, metadata=OMIT)
    vpt_deep: bool | None = field(default=None, metadata=OMIT)
    # the "handwritten" text path's template; None for a tuned bundle exported before it was recorded
    handwritten_template: str | None = field(default=None, metadata=OMIT)
    # /register's default text path and how it was chosen; None before the exporter recorded it ("learned")
    default_text_path: str | None = field(default=None, metadata=OMIT)
    default_text_path_source: str | None = field(default=None, metadata=OMIT)
    text_path_novel_top1: dict[str, float] | None = field(default=None, metadata=OMIT)
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> PromptInfo:
        vpt_length, vpt_deep, scores = d.get("vpt_length"), d.get("vpt_deep"), d.get("text_path_novel_top1")
        return cls(
            template=str(d["template"]),
            n_ctx=int(d.get("n_ctx", 0)),
            placeholder=str(d.get("placeholder", "X")),
            vpt_length=None if vpt_length is None else int(vpt_length),
            vpt_deep=None if vpt_deep is None else bool(vpt_deep),
            handwritten_template=_opt_str(d.get("handwritten_template")),
            default_text_path=_opt_str(d.get("default_text_path")),
            default_text_path_source=_opt_str(d.get("default_text_path_source")),
            text_path_novel_top1=None if scores is None else {str(k): v for k, v in scores.items()},
            extra=_extra(d, cls),
        )


@dataclass(frozen=True, kw_only=True)
class TokenizerInfo(Record):
    """``tokenizer``: the files and open_clip's special ids (the rest describes the tokenizer)."""

    file: str = "tokenizer.json"
    pretokenizer_file: str | None = field(default=None, metadata=OMIT)
    kind: str | None = field(default=None, metadata=OMIT)
    sot_id: int = 49406
    eot_id: int = 49407
    pad_id: int = 0
    vocab_size: int | None = field(default=None, metadata=OMIT)
    context_length: int | None = field(default=None, metadata=OMIT)
    lowercase: bool | None = field(default=None, metadata=OMIT)
    clean: str | None = field(default=None, metadata=OMIT)
    truncate: str | None = field(default=None, metadata=OMIT)
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> TokenizerInfo:
        def opt_int(key: str) -> int | None:
            v = d.get(key)
            return None if v is None else int(v)

        lowercase = d.get("lowercase")
        return cls(
            file=str(d.get("file", "tokenizer.json")),
            pretokenizer_file=_opt_str(d.get("pretokenizer_file")) or None,
            kind=_opt_str(d.get("kind")),
            sot_id=int(d.get("sot_id", 49406)),
            eot_id=int(d.get("eot_id", 49407)),
            pad_id=int(d.get("pad_id", 0)),
            vocab_size=opt_int("vocab_size"),
            context_length=opt_int("context_length"),
            lowercase=None if lowercase is None else bool(lowercase),
            clean=_opt_str(d.get("clean")),
            truncate=_opt_str(d.get("truncate")),
            extra=_extra(d, cls),
        )


@dataclass(frozen=True, kw_only=True)
class PreprocessInfo(Record):
    """``preprocess``: open_clip's eval transform (``serving.runtime.preprocess.PreprocessConfig``).

    ``crop``, ``convert`` and ``antialias`` are descriptive (the runtime derives them).
    """

    image_size: int
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int | None = field(default=None, metadata=OMIT)  # None: 0
    exif_transpose: bool = False
    crop: str | None = field(default=None, metadata=OMIT)
    convert: str | None = field(default=None, metadata=OMIT)
    antialias: bool | None = field(default=None, metadata=OMIT)
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> PreprocessInfo:
        mean, std, fill, antialias = d.get("mean"), d.get("std"), d.get("fill_color"), d.get("antialias")
        return cls(
            image_size=int(d["image_size"]),
            mean=cls.mean if mean is None else _triple(mean, "mean"),
            std=cls.std if std is None else _triple(std, "std"),
            interpolation=str(d.get("interpolation", "bicubic")),
            resize_mode=str(d.get("resize_mode", "shortest")),
            fill_color=None if fill is None else int(fill),
            exif_transpose=bool(d.get("exif_transpose", False)),
            crop=_opt_str(d.get("crop")),
            convert=_opt_str(d.get("convert")),
            antialias=None if antialias is None else bool(antialias),
            extra=_extra(d, cls),
        )


def _triple(value: JSONValue, name: str) -> tuple[float, float, float]:
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(f"preprocess.{name} must have 3 values, got {len(values)}")
    return values


@dataclass(frozen=True, kw_only=True)
class ClassesInfo(Record):
    """``classes``: how many, and the two files holding the names and the embedding bank."""

    count: int
    file: str = "classes.json"
    embeddings: str = "class_embeddings.npy"
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> ClassesInfo:
        return cls(
            count=int(d.get("count", 0)),
            file=str(d.get("file", "classes.json")),
            embeddings=str(d.get("embeddings", "class_embeddings.npy")),
            extra=_extra(d, cls),
        )


@dataclass(frozen=True, kw_only=True)
class TensorSpec(Record):
    """A graph's input or output: name, dtype and shape (``"N"`` for the batch)."""

    name: str
    dtype: str
    shape: list[int | str]
    l2_normalised: bool | None = field(default=None, metadata=OMIT)
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> TensorSpec:
        l2 = d.get("l2_normalised")
        return cls(
            name=str(d["name"]),
            dtype=str(d["dtype"]),
            shape=list(d["shape"]),
            l2_normalised=None if l2 is None else bool(l2),
            extra=_extra(d, cls),
        )


@dataclass(frozen=True, kw_only=True)
class GraphEntry(Record):
    """A ``graphs`` entry: the fp32 file, the fp16 one (None without ``--fp16``) and the I/O."""

    fp32: str
    fp16: str | None
    input: TensorSpec
    output: TensorSpec
    extra: JSONObject = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue]) -> GraphEntry:
        return cls(
            fp32=str(d["fp32"]),
            fp16=_opt_str(d.get("fp16")),
            input=TensorSpec.from_dict(_section(d, "input")),
            output=TensorSpec.from_dict(_section(d, "output")),
            extra=_extra(d, cls),
        )


@dataclass(frozen=True)
class ClassList(Record):
    """``classes.json``: the trained class names and their training counts (0 for a zero-shot class list)."""

    names: list[str]
    counts: list[int]

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write ``classes.json`` at ``path`` (as the exporter has always written it)."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1), encoding="utf-8")


@dataclass(frozen=True, kw_only=True)
class Manifest(Record):
    """``manifest.json`` of a bundle (docs/bundle.md's manifest table names every field)."""

    format_version: int
    created: str | None = None
    model: ModelIdentity = field(default_factory=ModelIdentity)
    source: SourceInfo = field(default_factory=SourceInfo)
    onnx: OnnxInfo = field(default_factory=OnnxInfo)
    logit_scale: float
    logit_bias: float | None = None
    embed_dim: int
    context_length: int
    prompt: PromptInfo
    tokenizer: TokenizerInfo
    preprocess: PreprocessInfo
    classes: ClassesInfo | None = field(default=None, metadata=OMIT)  # None: older bundles
    graphs: dict[str, GraphEntry] | None = field(default=None, metadata=OMIT)  # None: older bundles
    parity: JSONObject = field(default_factory=dict)  # export.parity's figures, descriptive
    files: dict[str, FileEntry]
    extra: JSONObject = field(default_factory=dict)

    REQUIRED = ("files", "embed_dim", "context_length", "logit_scale", "prompt", "tokenizer", "preprocess")

    @classmethod
    def from_dict(cls, d: Mapping[str, JSONValue], where: str = MANIFEST) -> Manifest:
        """A manifest from parsed JSON; :class:`BundleError` (naming ``where``) when it cannot be used."""
        if not isinstance(d, dict):
            raise BundleError(f"{where} is not a JSON object: the bundle is corrupt; {_FIX}")
        version = d.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BundleError(f"{where} has no valid format_version ({version!r}): {_FIX}")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{where} has format_version {version}, newer than this runtime supports ({FORMAT_VERSION}): "
                "upgrade flatprompt's serving runtime, or export the bundle with the matching older exporter"
            )
        for key in cls.REQUIRED:
            if key not in d:
                raise BundleError(f"{where} lacks the '{key}' entry: the bundle is incomplete; {_FIX}")
        if not isinstance(d["files"], dict):
            raise BundleError(f"{where}: 'files' must map file names to sha256/bytes; {_FIX}")
        files: dict[str, FileEntry] = {}
        for name, entry in d["files"].items():
            if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry:
                raise BundleError(f"{where}: the entry of {name} needs 'sha256' and 'bytes'; {_FIX}")
            try:
                files[str(name)] = FileEntry.from_dict(entry)
            except (TypeError, ValueError) as e:
                raise BundleError(f"{where}: the entry of {name} is not valid ({e}); {_FIX}") from e
        try:
            classes, graphs = d.get("classes"), d.get("graphs")
            bias = d.get("logit_bias")
            return cls(
                format_version=version,
                created=_opt_str(d.get("created")),
                model=ModelIdentity.from_dict(_section(d, "model")),
                source=SourceInfo.from_dict(_section(d, "source")),
                onnx=OnnxInfo.from_dict(_section(d, "onnx")),
                logit_scale=float(d["logit_scale"]),
                logit_bias=None if bias is None else float(bias),
                embed_dim=int(d["embed_dim"]),
                context_length=int(d["context_length"]),
                prompt=PromptInfo.from_dict(_section(d, "prompt")),
                tokenizer=TokenizerInfo.from_dict(_section(d, "tokenizer")),
                preprocess=PreprocessInfo.from_dict(_section(d, "preprocess")),
                classes=None if classes is None else ClassesInfo.from_dict(_section(d, "classes")),
                graphs=None
                if graphs is None
                else {str(k): GraphEntry.from_dict(_section(graphs, k)) for k in _section(d, "graphs")},
                parity=dict(_section(d, "parity")),
                files=files,
                extra=_extra(d, cls),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            what = f"lacks {e}" if isinstance(e, KeyError) else f"has a bad entry ({e})"
            raise BundleError(f"{where} {what}: the bundle is corrupt; {_FIX}") from e

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Manifest:
        """Parse and check ``manifest.json`` of the bundle directory ``path`` (no file checks)."""
        root = Path(path)
        if not root.is_dir():
            raise BundleError(
                f"bundle {root} is not a directory: pass the directory written by `python -m export`"
            )
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{mpath} is missing: {root} is not a bundle; {_FIX}")
        try:
            data = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"{mpath} is not valid JSON ({e}): the bundle is corrupt; {_FIX}") from e
        return cls.from_dict(data, str(mpath))

    def to_json(self) -> str:
        """The text of ``manifest.json`` (as the exporter has always written it)."""
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def write(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``manifest.json`` into ``directory``; returns its path."""
        path = Path(directory) / MANIFEST
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @property
    def default_text_path(self) -> str:
        """``prompt.default_text_path``, ``"learned"`` for a bundle exported before it was recorded."""
        return self.prompt.default_text_path or "learned"
