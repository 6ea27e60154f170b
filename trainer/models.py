"""Loading open_clip models: hub names + tags, local checkpoint files, run-time config JSONs.

Also the compact on-disk format of the embedded toy CLIP (``trainer/assets/toyclip.pt``): fp16 tensors and
only the token-embedding rows the toy world uses, so the committed file stays a few MB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from trainer.clip_adapter import activation_name
from trainer.errors import UserError, shorten
from trainer.weights import looks_like_path, require_weights

_logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
TOY_MODEL_NAME = "flatprompt-toyclip"
TOY_MODEL_CONFIG = ASSETS / f"{TOY_MODEL_NAME}.json"
TOY_MODEL_CHECKPOINT = ASSETS / "toyclip.pt"
COMPACT_FORMAT = "flatprompt-compact-clip/1"


@dataclass(frozen=True)
class PreprocessSpec:
    """How open_clip preprocesses images for this model (its ``visual.preprocess_cfg``)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear"
    resize_mode: str  # "shortest" | "longest" | "squash"


@dataclass(frozen=True)
class ModelIdentity:
    """Everything needed to rebuild the frozen CLIP: stored in every checkpoint and bundle."""

    name: str  # open_clip model name
    pretrained: str | None  # hub tag, a local file path, or None (random init)
    config_path: str | None  # JSON registered at run time, if any
    open_clip_version: str
    weights_sha256: str | None  # of the local checkpoint file, when there is one
    # the MLP activation the towers were built with (True: OpenAI's QuickGELU); None in checkpoints written
    # before it was recorded (those were built with the model config's own activation)
    quick_gelu: bool | None = None

    @property
    def activation(self) -> str | None:
        """``"quick_gelu"`` / ``"gelu"`` (None when not recorded)."""
        return None if self.quick_gelu is None else ("quick_gelu" if self.quick_gelu else "gelu")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class LoadedClip:
    model: torch.nn.Module  # open_clip.CLIP, frozen and in eval mode
    identity: ModelIdentity
    preprocess: PreprocessSpec


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def register_model_config(path: str | os.PathLike[str]) -> str:
    """Register an open_clip model config JSON at run time; returns the model name (the file stem)."""
    import open_clip

    p = Path(path)
    if not p.is_file():
        raise UserError(f"model config {p} does not exist: pass the path of an open_clip model JSON")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"model config {p} is not valid JSON ({e}): fix or regenerate the file") from e
    missing = {"embed_dim", "vision_cfg", "text_cfg"} - set(cfg)
    if missing:
        raise UserError(f"model config {p} lacks {sorted(missing)}: an open_clip config needs all three")
    open_clip.add_model_config(p)
    return p.stem


def ensure_toy_model_registered() -> None:
    """The toy CLIP's config ships with the package; register it so its name resolves anywhere."""
    import open_clip

    if TOY_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(TOY_MODEL_CONFIG)


def preprocess_spec(model: Any) -> PreprocessSpec:
    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    size = cfg.get("size", model.visual.image_size)
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise UserError(f"non-square image size {size} is not supported: use a model with square input")
        size = size[0]
    return PreprocessSpec(
        image_size=int(size),
        mean=tuple(float(v) for v in cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),  # type: ignore[arg-type]
        std=tuple(float(v) for v in cfg.get("std", (0.26862954, 0.26130258, 0.27577711))),  # type: ignore[arg-type]
        interpolation=str(cfg.get("interpolation", "bicubic")),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
    )


def resolve_quick_gelu(
    name: str,
    pretrained: str | None,
    *,
    local_file: bool,
    compact: bool = False,
    requested: bool | None = None,
    require_known: bool = True,
) -> tuple[bool, str]:
    """Which activation to build ``name`` with, and where that answer came from.

    The activation is not stored in the weights, so it must come from somewhere else: the user
    (``requested``, ``model.quick_gelu``), the hub tag's pretrained config (open_clip's ``openai`` tags say
    ``quick_gelu=True``, yet ``create_model("ViT-B-16", pretrained="openai")`` builds ``nn.GELU`` and only
    warns), the model config itself when it declares ``quick_gelu`` (the ``-quickgelu`` names, or a JSON with
    the key), or the packaged compact format (saved from a model built with its config). A plain local
    weights file under a config that does not say is refused (``require_known``), since the wrong activation
    silently degrades every number.
    """
    import open_clip

    cfg_value = (open_clip.get_model_config(name) or {}).get("quick_gelu")
    tag_value: bool | None = None
    if pretrained and not local_file:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if tag_cfg:
            tag_value = bool(tag_cfg.get("quick_gelu", False))
    if requested is not None:
        if tag_value is not None and tag_value != requested:
            _logger.warning(
                "model.quick_gelu=%s, but the weights of tag '%s' of '%s' were trained with quick_gelu=%s",
                requested,
                pretrained,
                name,
                tag_value,
            )
        return requested, "model.quick_gelu"
    if tag_value is not None:
        if cfg_value is not None and bool(cfg_value) != tag_value:
            _logger.warning(
                "model config '%s' says quick_gelu=%s but tag '%s' was trained with %s: using the tag's",
                name,
                cfg_value,
                pretrained,
                tag_value,
            )
        return tag_value, f"pretrained tag '{pretrained}'"
    if not pretrained:
        return bool(cfg_value), "model config (random init)"
    if compact:
        return bool(cfg_value), "packaged checkpoint (built from its model config)"
    if cfg_value is not None:
        return bool(cfg_value), f"model config '{name}'"
    if require_known:
        raise _unknown_activation(name, pretrained)
    return False, UNKNOWN_ACTIVATION


UNKNOWN_ACTIVATION = "model config's default (the weights file does not record it)"


def _unknown_activation(name: str, pretrained: str) -> UserError:
    return UserError(
        f"the activation of checkpoint {pretrained} cannot be known (model config '{name}' does not say "
        "quick_gelu, and a weights file does not record it): set model.quick_gelu=true for OpenAI-trained "
        "weights (QuickGELU), false for GELU (e.g. LAION / DataComp), or use the '-quickgelu' model name"
    )


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """A plain open_clip checkpoint, a {'state_dict': ...} wrapper, or the compact toy format (then the
    second value is True)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path)), False
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise UserError(
            f"checkpoint {path} could not be read ({type(e).__name__}: {shorten(str(e), 160)}): "
            "the file is corrupt or not a torch checkpoint; download or export it again"
        ) from e
    if isinstance(obj, dict) and obj.get("format") == COMPACT_FORMAT:
        return expand_compact_state_dict(obj), True
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"checkpoint {path} holds no state dict: pass an open_clip weights file")
    # strip DDP prefixes
    return {k.removeprefix("module."): v for k, v in obj.items()}, False


def _create(name: str, pretrained: str | None, quick_gelu: bool) -> Any:
    """``open_clip.create_model`` with the activation given explicitly, whatever the model config says."""
    import open_clip

    if quick_gelu:
        return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=True)
    if (open_clip.get_model_config(name) or {}).get("quick_gelu"):
        return open_clip.create_model(name, pretrained=pretrained, quick_gelu=False)  # constructor override
    return open_clip.create_model(name, pretrained=pretrained)


def _from_local_file(
    name: str, pretrained: str, quick_gelu: bool | None, require_known_activation: bool
) -> tuple[Any, bool, str]:
    """Model ``name`` with the weights of the local file ``pretrained``: (model, quick_gelu, where that
    came from)."""
    path = Path(pretrained)
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist: fix model.pretrained (--set model.pretrained=FILE) or "
            "train / download it first"
        )
    state, compact = _read_state_dict(path)
    use_quick_gelu, source = resolve_quick_gelu(
        name,
        pretrained,
        local_file=True,
        compact=compact,
        requested=quick_gelu,
        require_known=False,  # refused below, once the file is known to fit the model at all
    )
    logging.disable(logging.WARNING)  # open_clip warns "initialized randomly": the weights load next
    try:
        model = _create(name, None, use_quick_gelu)
    finally:
        logging.disable(logging.NOTSET)
    if model.logit_bias is None:
        state.pop("logit_bias", None)
    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = shorten(str(e).split("\n\t")[1] if "\n\t" in str(e) else str(e), 200)
        raise UserError(
            f"checkpoint {path} does not fit model '{name}' ({detail}): pass the model name it was trained with"
        ) from e
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"checkpoint {path} does not fit model '{name}' (missing {result.missing_keys[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}): pass the model name it was trained with"
        )
    if source == UNKNOWN_ACTIVATION and require_known_activation:
        raise _unknown_activation(name, pretrained)
    return model, use_quick_gelu, source


def _from_hub(
    name: str, pretrained: str | None, quick_gelu: bool | None, require_known_activation: bool
) -> tuple[Any, bool, str]:
    """Model ``name`` with an open_clip hub tag's weights (or random ones without a tag)."""
    if pretrained:
        # where the weights come from, before open_clip tries: an unknown tag, or a file that is neither
        # cached nor reachable, fails here in one line (HF_HUB_OFFLINE honoured), not after the hub
        # client's retries
        require_weights(name, pretrained)
    use_quick_gelu, source = resolve_quick_gelu(
        name, pretrained, local_file=False, requested=quick_gelu, require_known=require_known_activation
    )
    try:
        model = _create(name, pretrained or None, use_quick_gelu)
    except RuntimeError as e:
        raise UserError(
            f"could not load pretrained weights '{pretrained}' for '{name}' ({shorten(str(e), 300)}): "
            "check the tag with open_clip.list_pretrained(), or set model.pretrained to a local weights "
            "file (--set model.pretrained=FILE)"
        ) from e
    return model, use_quick_gelu, source


def load_clip(
    name: str,
    pretrained: str | None = None,
    config_path: str | None = None,
    device: str | torch.device = "cpu",
    quick_gelu: bool | None = None,
    require_known_activation: bool = True,
) -> LoadedClip:
    """Build an open_clip model, load its weights, freeze it and put it in eval mode.

    Args:
        name: open_clip model name (``ViT-B-16``) or the stem of ``config_path``.
        pretrained: an open_clip hub tag (``openai``, ``laion2b_s34b_b88k``; needs internet), a local
            checkpoint file, or None for random init.
        config_path: an open_clip model JSON to register first (its stem must equal ``name``).
        device: where to put the model.
        quick_gelu: the activation, when the caller knows it (``model.quick_gelu``); None takes it from the
            tag / model config (see :func:`resolve_quick_gelu`).
        require_known_activation: refuse a local weights file whose activation cannot be known; False
            (rebuilding a checkpoint written before the activation was recorded) uses the config's.
    """
    import open_clip

    ensure_toy_model_registered()
    if config_path:
        registered = register_model_config(config_path)
        if registered != name:
            raise UserError(
                f"model config {config_path} registers model '{registered}', not '{name}': "
                "set model.name to the file's stem"
            )
    if name not in open_clip.list_models():
        raise UserError(
            f"unknown open_clip model '{name}': use one of open_clip.list_models() "
            f"(e.g. ViT-B-16, {TOY_MODEL_NAME}) or pass model.config_path with its JSON"
        )
    if pretrained and (looks_like_path(pretrained) or Path(pretrained).exists()):
        model, use_quick_gelu, source = _from_local_file(
            name, pretrained, quick_gelu, require_known_activation
        )
        sha = file_sha256(pretrained)
    else:
        model, use_quick_gelu, source = _from_hub(name, pretrained, quick_gelu, require_known_activation)
        sha = None
    built = activation_name(model)
    if built != ("quick_gelu" if use_quick_gelu else "gelu"):
        raise UserError(
            f"model '{name}' was built with activation {built!r}, not the "
            f"{'quick_gelu' if use_quick_gelu else 'gelu'} asked for by the {source}: check the model config"
        )
    _logger.info("model %s: activation %s (from the %s)", name, built, source)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    identity = ModelIdentity(
        name=name,
        pretrained=pretrained,
        config_path=str(config_path) if config_path else None,
        open_clip_version=open_clip.__version__,
        weights_sha256=sha,
        quick_gelu=use_quick_gelu,
    )
    return LoadedClip(model=model, identity=identity, preprocess=preprocess_spec(model))


def load_toy_clip(device: str | torch.device = "cpu") -> LoadedClip:
    """The embedded default: the toy CLIP pretrained on the toy world (no downloads)."""
    if not TOY_MODEL_CHECKPOINT.is_file():
        raise UserError(
            f"the toy CLIP checkpoint {TOY_MODEL_CHECKPOINT} is missing: run "
            "`python -m trainer pretrain-toy` to rebuild it"
        )
    loaded = load_clip(TOY_MODEL_NAME, pretrained=str(TOY_MODEL_CHECKPOINT), device=device)
    # the packaged checkpoint is identified by name (pretrained=None) and hash, not by a machine's path
    loaded.identity = replace(loaded.identity, pretrained=None)
    return loaded


def load_model(
    name: str,
    pretrained: str | None = None,
    config_path: str | None = None,
    device: str | torch.device = "cpu",
    *,
    quick_gelu: bool | None = None,
    require_known_activation: bool = True,
) -> LoadedClip:
    """The frozen CLIP a run or checkpoint names: the packaged toy CLIP for ``(TOY_MODEL_NAME, None)``,
    otherwise :func:`load_clip` with the same arguments (the one place that makes this choice)."""
    if name == TOY_MODEL_NAME and pretrained is None:
        return load_toy_clip(device)
    return load_clip(
        name,
        pretrained,
        config_path,
        device,
        quick_gelu=quick_gelu,
        require_known_activation=require_known_activation,
    )


# ---------------------------------------------------------------------------------------------------------
# compact format


def save_compact_clip(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    used_token_ids: list[int],
    meta: Mapping[str, object],
) -> None:
    """Save fp16 weights and only the token-embedding rows in ``used_token_ids`` (the rest load as zeros)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    emb = state.pop("token_embedding.weight")
    ids = torch.tensor(sorted(set(used_token_ids)), dtype=torch.long)
    obj = {
        "format": COMPACT_FORMAT,
        "meta": meta,
        "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in state.items()},
        "token_rows": ids,
        "token_values": emb[ids].half(),
        "vocab_size": emb.shape[0],
    }
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def expand_compact_state_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    state = {k: v.float() if v.is_floating_point() else v for k, v in obj["state_dict"].items()}
    values = obj["token_values"].float()
    emb = torch.zeros(int(obj["vocab_size"]), values.shape[1])
    emb[obj["token_rows"]] = values
    state["token_embedding.weight"] = emb
    return state
