"""Run checkpoints: self-describing, written atomically, loadable without the run's config file.

A checkpoint carries the run config, the open_clip model identity, class names and counts, the prompt
settings and parameters, and the optimizer / scheduler / scaler state for an exact resume.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import StateDict

from trainer.errors import UserError
from trainer.evaluation import EvalReport, Headline, Selection
from trainer.models import ModelIdentity, file_sha256, load_model
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


@dataclass(frozen=True)
class BestEpoch:
    """Under ``eval.select=best_val``: the evaluated epoch with the best validation score so far, and its
    prompts (kept so that the run can end with them)."""

    epoch: int
    val_mean_per_class: float
    prompt_state: dict[str, torch.Tensor]


@dataclass
class RunCheckpoint:
    """``checkpoint.pt``: everything a run needs to resume exactly, to be evaluated, or to be exported.

    On disk it is a plain dict of Python values and tensors (``format`` = :data:`CHECKPOINT_FORMAT`, one
    key per field), so it loads without this class; :meth:`load` reads files written by earlier versions
    too (a field they lack takes its default). ``path`` is where it was loaded from (not saved).
    """

    config: Mapping[str, object]  # RunConfig.model_dump() of the run (older fields kept as written)
    identity: ModelIdentity
    prompt_spec: Mapping[str, object]  # PromptedCLIP.spec(): the prompt constructor arguments
    prompt_state: dict[str, torch.Tensor]
    class_names: list[str]
    class_counts: list[int]
    epoch: int = 0
    model_config_json: str | None = None  # the model config's text, for a model registered from a file
    novel_class_names: list[str] = field(default_factory=list)
    optimizer: StateDict | None = None
    scheduler: StateDict | None = None
    scaler: StateDict | None = None
    zero_shot: Headline | None = None
    zero_shot_per_class: list[float] | None = None
    eval: EvalReport | None = None
    best: BestEpoch | None = None
    selected: Selection | None = None
    path: str | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, object]:
        """The on-disk form (what :meth:`save` writes)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "config": dict(self.config),
            "identity": self.identity.to_dict(),
            "model_config_json": self.model_config_json,
            "prompt_spec": dict(self.prompt_spec),
            "prompt_state": self.prompt_state,
            "class_names": self.class_names,
            "class_counts": self.class_counts,
            "novel_class_names": self.novel_class_names,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "epoch": self.epoch,
            "zero_shot": self.zero_shot,
            "zero_shot_per_class": self.zero_shot_per_class,
            "eval": None if self.eval is None else self.eval.to_dict(),
            "best": None if self.best is None else asdict(self.best),
            **({} if self.selected is None else {"selected": self.selected.to_dict()}),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (:func:`atomic_torch_save`): a crash midway leaves the previous file."""
        atomic_torch_save(self.to_dict(), path)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], path: str | None = None) -> RunCheckpoint:
        """Build from the on-disk dict; ``KeyError`` / ``TypeError`` / ``ValueError`` when it lacks a
        required field or holds a wrong type (:meth:`load` turns them into a :class:`UserError`)."""
        ev, best, selected = d.get("eval"), d.get("best"), d.get("selected")
        return cls(
            config=dict(d.get("config") or {}),
            identity=ModelIdentity(**d["identity"]),
            prompt_spec=dict(d["prompt_spec"]),
            prompt_state=dict(d["prompt_state"]),
            class_names=[str(n) for n in d["class_names"]],
            class_counts=[int(c) for c in d["class_counts"]],
            epoch=int(d.get("epoch") or 0),
            model_config_json=d.get("model_config_json"),
            novel_class_names=[str(n) for n in d.get("novel_class_names") or []],
            optimizer=d.get("optimizer"),
            scheduler=d.get("scheduler"),
            scaler=d.get("scaler"),
            zero_shot=d.get("zero_shot"),
            zero_shot_per_class=d.get("zero_shot_per_class"),
            eval=EvalReport.from_dict(ev) if isinstance(ev, Mapping) else None,
            best=BestEpoch(int(best["epoch"]), float(best["val_mean_per_class"]), dict(best["prompt_state"]))
            if isinstance(best, Mapping)
            else None,
            selected=Selection.from_dict(selected) if isinstance(selected, Mapping) else None,
            path=path,
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunCheckpoint:
        """Read a checkpoint file or a run directory holding ``checkpoint.pt``.

        Raises:
            UserError: a missing, corrupt, foreign or incomplete file, naming it and the way out.
        """
        p = Path(path)
        if p.is_dir():
            p = p / CHECKPOINT_NAME
        if not p.is_file():
            raise UserError(
                f"checkpoint {p} does not exist: train first (python -m trainer fit) or fix the path"
            )
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
        try:
            return cls.from_dict(obj, path=str(p))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(
                f"checkpoint {p} is incomplete ({type(e).__name__}: {str(e)[:160]}): use a checkpoint written "
                "by `python -m trainer fit`"
            ) from e


def read_checkpoint(path: str | os.PathLike[str]) -> RunCheckpoint:
    """:meth:`RunCheckpoint.load`."""
    return RunCheckpoint.load(path)


@dataclass
class LoadedRun:
    """A checkpoint's prompted model, ready to use, with the record it came from."""

    model: PromptedCLIP
    checkpoint: RunCheckpoint
    checkpoint_sha256: str

    @property
    def class_names(self) -> list[str]:
        return self.checkpoint.class_names

    @property
    def class_counts(self) -> list[int]:
        return self.checkpoint.class_counts

    @property
    def identity(self) -> ModelIdentity:
        return self.checkpoint.identity

    @property
    def config(self) -> Mapping[str, object]:
        return self.checkpoint.config

    @property
    def novel_class_names(self) -> list[str]:
        return self.checkpoint.novel_class_names

    @property
    def epoch(self) -> int:
        return self.checkpoint.epoch


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
    spec: Mapping[str, object],
    device: str | torch.device,
    config_json: str | None = None,
) -> PromptedCLIP:
    """Rebuild the frozen CLIP from its identity and wrap it with prompts of the given spec."""
    import open_clip

    loaded = load_model(
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
    return PromptedCLIP(loaded.model, open_clip.get_tokenizer(identity.name), **spec).to(device)  # type: ignore[arg-type]


def load_prompted(
    path: str | os.PathLike[str] | RunCheckpoint, device: str | torch.device = "cpu"
) -> LoadedRun:
    """A training checkpoint (a path, or one already read) as a ready-to-use :class:`PromptedCLIP` on
    ``device``."""
    ckpt = path if isinstance(path, RunCheckpoint) else RunCheckpoint.load(path)
    model = build_prompted(ckpt.identity, ckpt.prompt_spec, device, ckpt.model_config_json)
    model.load_trainable_state_dict(ckpt.prompt_state)
    model.set_class_names(ckpt.class_names)
    model.eval()
    assert ckpt.path is not None
    return LoadedRun(model=model, checkpoint=ckpt, checkpoint_sha256=file_sha256(ckpt.path))
