"""Typed run configuration: the only place where YAML and command-line overrides are parsed.

Everything below the CLI receives plain typed arguments taken from these models, never the models
themselves. Unknown fields and bad values are refused with a message naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainer.errors import UserError
from trainer.optim.gcsam import GCSAM_BETA1, GCSAM_BETA2, GCSAM_GRANULARITY
from trainer.optim.gnm import GNM_CLIP_SIGMAS, GNM_KAPPA, GNM_NOISE_DECAY, GNM_SIGMA
from trainer.optim.registry import BASE_OPTIMIZERS, OPTIMIZERS, get_base_optimizer_spec, get_optimizer_spec
from trainer.reweight import DRW_BETA, LOGIT_ADJUST_TAU, RELOSSES, get_reloss_spec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    name: str = "flatprompt-toyclip"  # open_clip model name (ViT-B-16, ...) or a registered config's stem
    pretrained: str | None = None  # hub tag (openai, laion2b_s34b_b88k), a local file; toy: the packaged one
    config_path: str | None = None  # open_clip model JSON registered at run time
    # MLP activation: null = from the hub tag's pretrained config (openai: QuickGELU) or the model config
    # (the -quickgelu names); a local weights file under a config that does not say needs it set
    quick_gelu: bool | None = None


class PromptConfig(_Strict):
    n_ctx: int = Field(4, ge=0, le=64)  # CoOp context vectors M (0: hand-written template only)
    ctx_init: str | None = "a photo of a"  # phrase to initialise ctx from; null = random N(0, 0.02^2)
    vpt_length: int = Field(4, ge=0, le=200)  # visual prompt tokens per prompted block (0: off)
    vpt_deep: bool = True  # prompts before every block (deep) or only the first (shallow)
    # the hand-written prompt: zero-shot evaluation, the text side when n_ctx = 0, and KgCoOp's reference
    # features (loss.kg_weight; KgCoOp uses one template per dataset, "a photo of a {}." for most)
    template: str = "a photo of a {}."


class DataConfig(_Strict):
    kind: Literal["toy", "cifar100", "cifar100_lt", "splitfile", "imagefolder"] = "toy"
    root: str | None = None  # dataset root (not used by the toy world)
    imbalance: float | None = Field(
        None, ge=1.0
    )  # long-tail imbalance factor; null = dataset default (toy 100)
    n_max: int | None = Field(None, ge=1)  # head-class count of the profile (dataset default when null)
    shots: int | None = Field(None, ge=1)  # K-shot sampling per class (null = all)
    base_to_novel: bool = False  # CoCoOp split: train on the first half of the classes
    train_file: str | None = None  # split files (ImageNet-LT / Places-LT / iNat format)
    test_file: str | None = None
    names_file: str | None = None
    # class-order file (one class name or loaded label per line; line i becomes label i): the label ids
    # the base-to-novel split and the long-tail profile follow; null = the loader's order (sorted folders)
    class_order: str | None = None
    seed: int = (
        0  # seed of the few-shot draw / the toy world (the long-tail profile uses seed 0, as the papers)
    )
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    num_workers: int = Field(0, ge=0)
    # training augmentation (trainer/transforms.py): clip_rrc = open_clip's RandomResizedCrop(scale 0.9..1),
    # no flip (the default, the toy numbers); coop = Dassl's RandomResizedCrop(0.08..1) + flip (CoOp, GCSCoOp);
    # gnm_cifar = GNM-PT's RandomCrop(32, pad 4) + flip + AutoAugment(CIFAR10) + Cutout(16), then resize;
    # none = the evaluation transform. true / false are read as clip_rrc / none.
    augment: Literal["none", "clip_rrc", "coop", "gnm_cifar"] = "clip_rrc"
    # cifar100 / cifar100_lt: download cifar-100-python.tar.gz (about 169 MB) into root when it is missing
    download: bool = False
    # fit: decode every image file the run reads, on all cores, before the model is loaded (a bad file then
    # stops the run in minutes, not hours into training); false skips it (`python -m trainer check` does it too)
    scan: bool = True
    # leave missing or undecodable image files out of the run, each with a warning, counted in summary.json;
    # false: they stop the run before the model is loaded
    skip_unreadable: bool = False

    @model_validator(mode="after")
    def _check_data(self) -> DataConfig:
        if self.download and self.kind not in ("cifar100", "cifar100_lt"):
            raise ValueError(
                f"data.download=true: only CIFAR-100 (data.kind cifar100 / cifar100_lt) can be downloaded, not "
                f"{self.kind}; fetch the dataset yourself and set data.root"
            )
        if self.skip_unreadable and not self.scan and self.kind not in ("toy", "cifar100", "cifar100_lt"):
            raise ValueError(
                "data.skip_unreadable=true needs data.scan=true (the unreadable files are found by the scan)"
            )
        return self

    @field_validator("augment", mode="before")
    @classmethod
    def _augment_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # the field used to be a flag
            return "clip_rrc" if value else "none"
        return value


class OptimConfig(_Strict):
    # names, defaults and hyperparameters come from the registry (trainer/optim/registry.py)
    name: str = Field("sgd", json_schema_extra={"enum": list(OPTIMIZERS)})
    base: str = Field("sgd", json_schema_extra={"enum": list(BASE_OPTIMIZERS)})  # of sam/asam/gnm/gcsam
    lr: float = Field(0.05, gt=0)  # toy-world default; the recipes set the papers' values
    weight_decay: float = Field(5e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    rho: float | None = Field(None, ge=0)  # null: the spec's default_rho (trainer.optim.DEFAULT_RHO)
    kappa: float = Field(GNM_KAPPA, ge=0)  # GNM noise multiplier
    sigma: float = Field(GNM_SIGMA, gt=0)  # GNM base std
    clip_sigmas: float = Field(GNM_CLIP_SIGMAS, gt=0)  # GNM clamp at this many sigmas
    noise_decay: float = Field(GNM_NOISE_DECAY, gt=0, le=1)  # GNM noise factor from the re-weighting epoch on
    beta1: float = GCSAM_BETA1  # GCSAM lower cosine bound
    beta2: float = GCSAM_BETA2  # GCSAM upper cosine bound
    granularity: Literal["tensor", "global"] = GCSAM_GRANULARITY  # GCSAM cosine per tensor or over all
    grad_clip: float | None = Field(None, gt=0)  # max global grad norm, on the final gradient only
    accumulation: int = Field(1, ge=1)  # gradient accumulation micro-steps (one-pass optimizers only)

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        get_optimizer_spec(value)  # ValueError naming the value and the registered names
        return value

    @field_validator("base")
    @classmethod
    def _known_base(cls, value: str) -> str:
        get_base_optimizer_spec(value)
        return value


class ReweightConfig(_Strict):
    # names from the re-weighting registry (trainer/reweight.py RELOSSES)
    name: str = Field("none", json_schema_extra={"enum": list(RELOSSES)})
    beta: float = Field(DRW_BETA, ge=0, lt=1)  # DRW effective-number beta
    start_epoch: int | None = Field(None, ge=0)  # DRW switch (0-indexed); null = 80% of the epochs
    tau: float = Field(LOGIT_ADJUST_TAU, ge=0)  # logit adjustment temperature

    @field_validator("name")
    @classmethod
    def _known_name(cls, value: str) -> str:
        get_reloss_spec(value)  # ValueError naming the value and the registered names
        return value


class LossConfig(_Strict):
    # KgCoOp (Yao et al., CVPR 2023): + kg_weight * (1 - mean_c cos(t_c, t_c^hand)) over the training
    # classes, t^hand = the frozen text tower over prompt.template; 0 = off; KgCoOp's recipes use 8.0
    kg_weight: float = Field(0.0, ge=0)


class TrainConfig(_Strict):
    epochs: int = Field(6, ge=1)
    warmup_epochs: float = Field(1.0, ge=0)  # linear warm-up, then cosine to 0 (per step)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the prompted model (CUDA only)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    out_dir: str = "runs/toy"
    eval_every: int = Field(1, ge=1)  # epochs between evaluations
    resume: bool = True  # continue from out_dir/checkpoint.pt when it exists


class EvalConfig(_Strict):
    many_above: int = 100  # many-shot: train count > this (LIFT)
    few_below: int = 20  # few-shot: train count < this (LIFT)
    # post-hoc logit adjustment (Menon et al.): also report base top-1 / many / medium / few of
    # argmax_j (z_j - tau log pi_j) beside the plain ones; null = off
    posthoc_tau: float | None = Field(None, ge=0)
    # model selection: last = the last epoch's prompts (CoOp / GCSCoOp); best_val = the evaluated epoch with the
    # best mean per-class accuracy on a validation split carved from the TRAINING data (val_fraction per
    # class, never the test set; GNM-PT instead reported the best epoch on its test loader)
    select: Literal["last", "best_val"] = "last"
    val_fraction: float = Field(0.1, gt=0, lt=1)


class RunConfig(_Strict):
    model: ModelConfig = ModelConfig()
    prompt: PromptConfig = PromptConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    reweight: ReweightConfig = ReweightConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.optim.accumulation > 1 and get_optimizer_spec(self.optim.name).passes > 1:
            raise ValueError(
                f"optim.accumulation={self.optim.accumulation} does not compose with two-pass optimizer "
                f"'{self.optim.name}' (each micro-batch would need its own ascent step): set it to 1"
            )
        if self.loss.kg_weight > 0 and self.prompt.n_ctx == 0:
            raise ValueError(
                f"loss.kg_weight={self.loss.kg_weight} regularises a learned text context, but prompt.n_ctx is 0 "
                "(the text side is the hand-written template already): set prompt.n_ctx > 0 or loss.kg_weight=0"
            )
        if self.prompt.n_ctx == 0 and self.prompt.vpt_length == 0:
            raise ValueError("nothing to train: set prompt.n_ctx > 0 and/or prompt.vpt_length > 0")
        return self

    def drw_epoch(self) -> int:
        """The 0-indexed epoch at which re-weighting (and GNM's noise decay) switches on."""
        if self.reweight.start_epoch is not None:
            return self.reweight.start_epoch
        return int(0.8 * self.train.epochs)


def _set_dotted(tree: dict[str, object], dotted: str, value: object) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise UserError(f"override '{dotted}': '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def _format_validation(e: ValidationError, source: str) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        parts.append(f"{loc}: {err['msg']}")
    return f"invalid config ({source}): " + "; ".join(parts) + " - fix the value or remove the field"


RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
"""The packaged recipes (``trainer/recipes/*.yaml``; ``recipes/`` at the repository root links here)."""


def resolve_recipe(path: str | Path) -> Path:
    """``path`` when it names a file; otherwise the packaged recipe it names (``gnm_drw_cifar100_lt``,
    ``recipes/gnm_drw_cifar100_lt.yaml``), so recipes work from an installed wheel in any directory."""
    p = Path(path)
    if p.is_file():
        return p
    packaged = RECIPES_DIR / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    return packaged if packaged.is_file() else p


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults <- YAML file <- ``key.sub=value`` overrides (values parsed as YAML scalars)."""
    tree: dict[str, object] = {}  # parsed YAML: arbitrary until validated
    source = "defaults"
    if path is not None:
        p = resolve_recipe(path)
        if not p.is_file():
            raise UserError(
                f"config file {p} does not exist: pass a YAML file, or the name of a packaged recipe "
                f"({', '.join(sorted(x.stem for x in RECIPES_DIR.glob('*.yaml')))})"
            )
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(loaded, dict):
            raise UserError(f"config file {p} must hold a mapping of sections (model:, data:, ...)")
        tree = loaded
        source = str(p)
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like section.field=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise UserError(_format_validation(e, source)) from e


# Fields a resumed run may change: where it runs, where its files are, how often / how fast it evaluates;
# never what it learns. (The files themselves are checked by content: the model's identity and the
# classes and counts of the data are compared with the checkpoint's separately.)
RESUME_FREE_FIELDS = frozenset(
    {
        "train.out_dir",
        "train.resume",
        "train.device",
        "train.compile",
        "train.eval_every",
        "data.num_workers",
        "data.eval_batch_size",
        "data.root",
        "data.train_file",
        "data.test_file",
        "data.names_file",
        "data.download",
        "data.scan",
        "data.skip_unreadable",  # what it skips changes the counts, which are compared by content
        "eval.posthoc_tau",
        "model.pretrained",
        "model.config_path",
    }
)


def _flatten(tree: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_conflicts(saved: Mapping[str, object], current: RunConfig) -> list[str]:
    """``field: saved -> current`` for every field, outside :data:`RESUME_FREE_FIELDS`, in which the config a
    checkpoint was written with (``saved``, a ``model_dump``) differs from ``current``.

    A field the saved config lacks (added to the code after it was written) counts as its default; a field
    the code no longer has is ignored.
    """
    new = _flatten(current.model_dump())
    old = {**_flatten(RunConfig().model_dump()), **_flatten(saved)}
    if isinstance(old.get("data.augment"), bool):  # written when the field was a flag
        old["data.augment"] = "clip_rrc" if old["data.augment"] else "none"
    return [
        f"{key}: {old.get(key)!r} -> {new[key]!r}"
        for key in sorted(new)
        if key not in RESUME_FREE_FIELDS and old.get(key) != new[key]
    ]
