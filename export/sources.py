"""What gets exported: a PromptedCLIP with its class list, identity and preprocessing.

Three ways to get one: a training checkpoint (prompt-tuned), an open_clip model + class names (zero-shot),
or the embedded toy CLIP (zero-shot). Tests and other code can also wrap any PromptedCLIP directly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.errors import UserError
from trainer.models import LoadedClip, ModelIdentity, PreprocessSpec, preprocess_spec
from trainer.prompts import PromptedCLIP

_logger = logging.getLogger(__name__)

PROMPT_TUNED = "prompt_tuned"
ZERO_SHOT = "zero_shot"


@dataclass
class ExportSource:
    """Everything the exporter needs.

    Attributes:
        model: a ``trainer.prompts.PromptedCLIP`` (frozen CLIP + learned prompts, or n_ctx = 0), on the CPU.
        class_names, class_counts: the trained classes (counts are 0 for a zero-shot class list).
        identity: the open_clip model identity (name, pretrained, config path, weights sha256).
        preprocess: the model's eval transform settings.
        kind: ``prompt_tuned`` or ``zero_shot``.
        checkpoint, checkpoint_sha256: the training checkpoint, when there is one.
        extra: additional manifest ``source`` fields (epoch, ...).
        handwritten_template: the hand-written prompt (``prompt.template`` of the run: zero-shot evaluation,
            KgCoOp's reference), exported as the ``handwritten`` text path; None = ``"a photo of a {}."``.
    """

    model: PromptedCLIP
    class_names: list[str]
    class_counts: list[int]
    identity: ModelIdentity
    preprocess: PreprocessSpec
    kind: str
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    extra: dict[str, object] = field(default_factory=dict)
    handwritten_template: str | None = None

    def __post_init__(self) -> None:
        check_class_names(self.class_names, "the class list")
        if len(self.class_counts) != len(self.class_names):
            raise UserError(
                f"{len(self.class_names)} class names but {len(self.class_counts)} counts: give one count per class"
            )


def check_class_names(names: list[str], where: str) -> None:
    """Non-empty, no blank names, no duplicates."""
    if not names:
        raise UserError(f"{where} is empty: give at least one class name")
    blank = [i for i, n in enumerate(names) if not str(n).strip()]
    if blank:
        raise UserError(f"{where} has blank class names (positions {blank[:5]}): remove them")
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dups:
        raise UserError(f"{where} repeats class names {dups[:5]}: every class name must be unique")


def read_class_file(path: str | os.PathLike[str]) -> list[str]:
    """One class name per line; blank lines and lines starting with '#' are skipped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"class file {p} does not exist: pass a text file with one class name per line")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"class file {p} cannot be read as UTF-8 text ({e}): fix its encoding") from e
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    check_class_names(names, f"class file {p}")
    return names


def from_checkpoint(
    path: str | os.PathLike[str],
    expect_model: str | None = None,
    expect_pretrained: str | None = None,
) -> ExportSource:
    """A prompt-tuned source from ``python -m trainer fit``'s checkpoint (file or run directory).

    ``expect_model`` / ``expect_pretrained`` (the CLI's ``--model`` / ``--pretrained``) must match the
    identity stored in the checkpoint: exporting a checkpoint under another model's name is refused.
    """
    from trainer.checkpoint import RunCheckpoint, load_prompted

    ckpt = RunCheckpoint.load(path)  # UserError on missing / corrupt / foreign / incomplete files
    stored = ckpt.identity
    if expect_model and stored.name != expect_model:
        raise UserError(
            f"checkpoint {ckpt.path} was trained on model '{stored.name}', not '{expect_model}': "
            "drop --model or pass the checkpoint of that model"
        )
    if expect_pretrained and stored.pretrained != expect_pretrained:
        raise UserError(
            f"checkpoint {ckpt.path} was trained on weights '{stored.pretrained}', not "
            f"'{expect_pretrained}': drop --pretrained or pass the matching checkpoint"
        )
    try:
        run = load_prompted(ckpt, device="cpu")
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise UserError(
            f"checkpoint {ckpt.path} does not fit its model ({type(e).__name__}: "
            f"{str(e)[:160]}): use a checkpoint written by `python -m trainer fit`"
        ) from e
    model = run.model.float().eval()
    return ExportSource(
        model=model,
        class_names=list(run.class_names),
        class_counts=[int(c) for c in run.class_counts],
        identity=run.identity,
        preprocess=preprocess_spec(model.clip),
        kind=PROMPT_TUNED,
        checkpoint=str(Path(str(ckpt.path)).resolve()),
        checkpoint_sha256=run.checkpoint_sha256,
        extra={
            "epoch": run.epoch,
            "novel_class_names": list(run.novel_class_names),
            "data_kind": _stored(ckpt.config, "data", "kind"),
            "data_seed": _stored(ckpt.config, "data", "seed") or 0,
        },
        handwritten_template=_stored(ckpt.config, "prompt", "template"),
    )


def _stored(config: Mapping[str, object], section: str, name: str) -> Any:
    """A field of a checkpoint's stored config; None when the section or field predates the checkpoint."""
    part = config.get(section)
    return part.get(name) if isinstance(part, Mapping) else None


def from_loaded_clip(loaded: LoadedClip, class_names: list[str], template: str) -> ExportSource:
    """A zero-shot source: the hand-written ``template`` over ``class_names``."""
    if "{}" not in template:
        raise UserError(f"template '{template}' has no '{{}}' for the class name, e.g. 'a photo of a {{}}.'")
    model = PromptedCLIP.zero_shot(loaded, template=template).float().eval()
    return ExportSource(
        model=model,
        class_names=list(class_names),
        class_counts=[0] * len(class_names),
        identity=loaded.identity,
        preprocess=loaded.preprocess,
        kind=ZERO_SHOT,
        handwritten_template=template,
    )


def zero_shot(
    model_name: str,
    pretrained: str | None,
    class_names: list[str],
    template: str,
    config_path: str | None = None,
) -> ExportSource:
    """Zero-shot source from an open_clip model name + weights (hub tag or local file)."""
    from trainer.models import load_clip

    loaded = load_clip(model_name, pretrained, config_path, device="cpu")
    return from_loaded_clip(loaded, class_names, template)


def toy(class_names: list[str] | None, template: str) -> ExportSource:
    """Zero-shot source from the embedded toy CLIP (default classes: every colour-shape pair)."""
    from trainer.models import load_toy_clip

    if class_names is None:
        from trainer.toyworld.task import all_class_names

        class_names = all_class_names()
    return from_loaded_clip(load_toy_clip("cpu"), class_names, template)
