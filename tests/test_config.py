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
