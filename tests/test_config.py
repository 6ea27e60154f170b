"""Config loading: defaults, YAML, dotted overrides, and clear refusals naming the field."""

from __future__ import annotations

import pytest

from trainer.config import RunConfig, load_config, resume_conflicts
from trainer.errors import UserError


def test_defaults_are_the_toy_world():
    cfg = load_config()
    assert cfg.model.name == "flatprompt-toyclip"
    assert cfg.data.kind == "toy"
    assert cfg.drw_epoch() == int(0.8 * cfg.train.epochs)


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("optim:\n  name: gnm\n  lr: 0.01\ntrain:\n  epochs: 5\n")
    cfg = load_config(
        f, ["train.epochs=7", "reweight.name=drw", "reweight.start_epoch=3", "prompt.ctx_init=null"]
    )
    assert cfg.optim.name == "gnm" and cfg.optim.lr == 0.01
    assert cfg.train.epochs == 7
    assert cfg.drw_epoch() == 3
    assert cfg.prompt.ctx_init is None


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["optim.nmae=sgd"], "optim.nmae"),
        (["optim.name=adam"], "optim.name"),
        (["train.epochs=0"], "train.epochs"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.name=sam", "optim.accumulation=2"], "accumulation"),
        (["prompt.n_ctx=0", "prompt.vpt_length=0"], "nothing to train"),
        (["epochs"], "section.field=value"),
    ],
)
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(UserError, match=needle):
        load_config(None, overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "optim.name=adam",
            r"optim\.name: .*unknown optimizer 'adam': expected one of \('sgd', 'adamw', 'sam'",
        ),
        (
            "optim.base=adam",
            r"optim\.base: .*unknown base optimizer 'adam': expected one of \('sgd', 'adamw'\)",
        ),
        (
            "reweight.name=focal",
            r"reweight\.name: .*unknown re-weighting 'focal': expected one of \('none', 'drw'",
        ),
    ],
)
def test_unknown_registry_names_list_the_registered_ones(override, message):
    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_config_names_and_defaults_come_from_the_registries():
    from trainer.optim import BASE_OPTIMIZERS, OPTIMIZERS
    from trainer.optim.gcsam import GCSAM_BETA1, GCSAM_BETA2, GCSAM_GRANULARITY
    from trainer.optim.gnm import GNM_CLIP_SIGMAS, GNM_KAPPA, GNM_NOISE_DECAY, GNM_SIGMA
    from trainer.reweight import RELOSSES

    schema = RunConfig.model_json_schema()["$defs"]
    assert schema["OptimConfig"]["properties"]["name"]["enum"] == list(OPTIMIZERS)
    assert schema["OptimConfig"]["properties"]["base"]["enum"] == list(BASE_OPTIMIZERS)
    assert schema["ReweightConfig"]["properties"]["name"]["enum"] == list(RELOSSES)
    for name in OPTIMIZERS:
        load_config(None, [f"optim.name={name}"])  # every registered name is accepted
    o = load_config(None, []).optim
    assert (o.kappa, o.sigma, o.clip_sigmas, o.noise_decay) == (
        GNM_KAPPA,
        GNM_SIGMA,
        GNM_CLIP_SIGMAS,
        GNM_NOISE_DECAY,
    )
    assert (o.beta1, o.beta2, o.granularity) == (GCSAM_BETA1, GCSAM_BETA2, GCSAM_GRANULARITY)
    # the accumulation check reads the spec's passes: every two-pass optimizer is refused, one-pass ones not
    for name, spec in OPTIMIZERS.items():
        if spec.passes == 2:
            with pytest.raises(UserError, match="two-pass"):
                load_config(None, [f"optim.name={name}", "optim.accumulation=2"])
        else:
            assert load_config(None, [f"optim.name={name}", "optim.accumulation=2"]).optim.accumulation == 2


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(UserError, match="mapping"):
        load_config(scalar)


def test_round_trip_through_dump():
    cfg = load_config(None, ["optim.name=gcsam", "optim.rho=0.2"])
    again = RunConfig.model_validate(cfg.model_dump())
    assert again == cfg


def test_resume_conflicts_names_changed_fields_only() -> None:
    saved = load_config(None, ["optim.name=gnm", "train.epochs=3"]).model_dump()
    assert resume_conflicts(saved, load_config(None, ["optim.name=gnm", "train.epochs=3"])) == []
    changed = load_config(None, ["optim.name=sam", "train.epochs=3", "train.eval_every=2", "data.root=/x"])
    assert resume_conflicts(saved, changed) == ["optim.name: 'gnm' -> 'sam'"]  # eval_every, root are free
    # a checkpoint from before a field existed: the missing field counts as its default
    del saved["optim"]["accumulation"]
    saved["optim"]["retired_field"] = 1  # and a field the code no longer has is ignored
    current = load_config(None, ["optim.name=gnm", "train.epochs=3"])
    assert resume_conflicts(saved, current) == []
    current = load_config(None, ["optim.name=gnm", "train.epochs=3", "optim.accumulation=2"])
    assert resume_conflicts(saved, current) == ["optim.accumulation: 1 -> 2"]
