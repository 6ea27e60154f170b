"""Run checkpoints: self-describing, written atomically, loadable without the run's config file.

A checkpoint carries the run config, the open_clip model identity, class names and counts, the prompt
settings and parameters, and the optimizer / scheduler / scaler state for an exact resume.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainer.errors import UserError
from trainer.models import ModelIdentity, file_sha256, load_clip, load_toy_clip
from trainer.prompts import PromptedCLIP

CHECKPOINT_FORMAT = "flatprompt-run/1"
CHECKPOINT_NAME = "checkpoint.pt"


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash midway leaves the previous file untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise UserError(f"checkpoint {p} does not exist: train first (python -m trainer fit) or fix the path")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickle errors, foreign files...
        raise UserError(
            f"checkpoint {p} is corrupt or not a flatprompt checkpoint ({type(e).__name__}): "
            "use an earlier checkpoint or train again"
        ) from e
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {p} is not a {CHECKPOINT_FORMAT} checkpoint: pass a file written by `python -m trainer fit`"
        )
    obj["_path"] = str(p)
    return obj


@dataclass
class LoadedRun:
    model: PromptedCLIP
    class_names: list[str]
    class_counts: list[int]
    identity: ModelIdentity
    checkpoint_sha256: str
    config: dict[str, Any]
    novel_class_names: list[str] = field(default_factory=list)
    epoch: int = 0


def identity_from_dict(d: dict[str, Any]) -> ModelIdentity:
    return ModelIdentity(**d)


def _config_path_for(identity: ModelIdentity, config_json: str | None) -> str | None:
    """The model config JSON to register: the original path, or the copy embedded in the checkpoint.

    Checkpoints carry the config's text, so they load on another machine or from another directory.
    """
    if identity.config_path is None or Path(identity.config_path).is_file() or config_json is None:
        return identity.config_path
    cache = Path(tempfile.gettempdir()) / "flatprompt-model-configs"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{identity.name}.json"
    path.write_text(config_json)
    return str(path)


def build_prompted(
    identity: ModelIdentity,
    spec: dict[str, Any],
    device: str | torch.device,
    config_json: str | None = None,
) -> PromptedCLIP:
    """Rebuild the frozen CLIP from its identity and wrap it with prompts of the given spec."""
    import open_clip

    from trainer.models import TOY_MODEL_NAME

    if identity.name == TOY_MODEL_NAME and identity.pretrained is None:
        loaded = load_toy_clip(device)
    else:
        loaded = load_clip(
            identity.name,
            identity.pretrained,
            _config_path_for(identity, config_json),
            device,
            quick_gelu=identity.quick_gelu,  # as trained; None: written before it was recorded
            require_known_activation=identity.quick_gelu is not None,
        )
    if identity.weights_sha256 and loaded.identity.weights_sha256 != identity.weights_sha256:
        raise UserError(
            f"the CLIP weights of '{identity.name}' ({identity.pretrained or 'packaged'}) changed since this "
            f"checkpoint was trained (sha256 {str(loaded.identity.weights_sha256)[:12]} != "
            f"{identity.weights_sha256[:12]}): restore the original weights file"
        )
    return PromptedCLIP(loaded.model, open_clip.get_tokenizer(identity.name), **spec).to(device)


def load_prompted(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedRun:
    """Load a training checkpoint as a ready-to-use :class:`PromptedCLIP` on ``device``."""
    ckpt = read_checkpoint(path)
    identity = identity_from_dict(ckpt["identity"])
    model = build_prompted(identity, ckpt["prompt_spec"], device, ckpt.get("model_config_json"))
    model.load_trainable_state_dict(ckpt["prompt_state"])
    model.set_class_names(ckpt["class_names"])
    model.eval()
    return LoadedRun(
        model=model,
        class_names=list(ckpt["class_names"]),
        class_counts=list(ckpt["class_counts"]),
        identity=identity,
        checkpoint_sha256=file_sha256(ckpt["_path"]),
        config=ckpt["config"],
        novel_class_names=list(ckpt.get("novel_class_names", [])),
        epoch=int(ckpt.get("epoch", 0)),
    )
