"""The typed records written to disk: checkpoint, summary.json, metrics.jsonl lines.

Each round-trips to the dict the previous (untyped) code wrote, and files written before a field existed
still load.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CHECKPOINT_FORMAT, BestEpoch, RunCheckpoint, atomic_torch_save
from trainer.errors import UserError
from trainer.evaluation import EvalReport, RunSummary, Selection, to_jsonable
from trainer.models import ModelIdentity
from trainer.training import EpochRecord

IDENTITY = ModelIdentity("tiny-clip", None, None, "3.3.0", "ab" * 32, quick_gelu=False)
HEADLINE = {"base_top1": 0.5, "base_mean_per_class": 0.4, "many": 0.7, "medium": None, "few": 0.1, "ece": 0.2}
BASE = {
    "top1": 0.5,
    "mean_per_class": 0.4,
    "per_class": [0.7, float("nan"), 0.1],
    "many": 0.7,
    "medium": None,
    "few": 0.1,
    "ece": 0.2,
    "num_test": 12,
    "group_sizes": {"many": 1, "medium": 1, "few": 1},
    "shot_rule": "LIFT: many > 100, medium 20..100, few < 20",
}
NOVEL = {"top1": 0.25, "mean_per_class": 0.3, "per_class": [0.25, 0.35], "ece": 0.1, "num_test": 8}


def _eval(novel: bool = True, posthoc: bool = False) -> dict:
    base = dict(BASE)
    if posthoc:
        base["posthoc"] = {
            k: BASE[k] for k in ("top1", "mean_per_class", "many", "medium", "few", "per_class")
        }
        base["posthoc"]["tau"] = 1.0
    out: dict = {"base": base, "shot_rule": BASE["shot_rule"]}
    if novel:
        out.update(novel=dict(NOVEL), hm=0.333, hm_mean_per_class=0.34, hm_rule="base / novel / hm: top-1")
    return out


def _same(a: object, b: object) -> bool:
    """Equality with NaN == NaN and tensors compared by value."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return isinstance(b, list | tuple) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


@pytest.mark.parametrize(("novel", "posthoc"), [(True, False), (False, True), (True, True)])
def test_eval_report_round_trips(novel: bool, posthoc: bool) -> None:
    d = _eval(novel, posthoc)
    report = EvalReport.from_dict(d)
    assert _same(report.to_dict(), d)
    h = report.headline()
    assert h["base_top1"] == 0.5 and ("novel" in h) == novel and ("posthoc_few" in h) == posthoc


def _old_checkpoint(best: bool) -> dict:
    """A checkpoint with every key the pre-record code of trainer/runner.py wrote."""
    state = {"ctx": torch.arange(6.0).reshape(2, 3)}
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": {"model": {"name": "tiny-clip"}, "train": {"epochs": 2}},
        "identity": IDENTITY.to_dict(),
        "model_config_json": None,
        "prompt_spec": {"n_ctx": 2, "ctx_init": None, "vpt_length": 0, "vpt_deep": False, "template": "{}"},
        "prompt_state": state,
        "class_names": ["red", "green", "blue"],
        "class_counts": [5, 3, 1],
        "novel_class_names": ["cyan"],
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "scheduler": {"last_epoch": 4},
        "scaler": None,
        "epoch": 2,
        "zero_shot": dict(HEADLINE),
        "zero_shot_per_class": [0.1, 0.2, 0.3],
        "eval": _eval(),
        "best": {"epoch": 1, "val_mean_per_class": 0.6, "prompt_state": {"ctx": state["ctx"] + 1}}
        if best
        else None,
    }
    if best:
        ckpt["selected"] = {"rule": "best_val", "epoch": 1, "val_mean_per_class": 0.6, "val_images": 3}
    return ckpt


@pytest.mark.parametrize("best", [False, True])
def test_checkpoint_round_trips_the_old_dict(tmp_path: Path, best: bool) -> None:
    old = _old_checkpoint(best)
    path = tmp_path / "checkpoint.pt"
    atomic_torch_save(old, path)
    ckpt = RunCheckpoint.load(tmp_path)  # a run directory works too
    assert ckpt.path == str(path) and ckpt.epoch == 2 and ckpt.identity == IDENTITY
    assert isinstance(ckpt.eval, EvalReport) and ckpt.eval.novel is not None
    assert (ckpt.best is not None) == best and (ckpt.selected is not None) == best
    if best:
        assert isinstance(ckpt.best, BestEpoch) and ckpt.selected == Selection("best_val", 1, 0.6, 3)
    assert _same(ckpt.to_dict(), old)
    again = tmp_path / "again.pt"
    ckpt.save(again)
    assert _same(torch.load(again, weights_only=False), old)


def test_minimal_old_checkpoint_loads_with_defaults(tmp_path: Path) -> None:
    """What the exporter's fixture and the earliest format held: no optimizer, no eval, no novel list."""
    old = {
        k: v
        for k, v in _old_checkpoint(False).items()
        if k in {"format", "config", "identity", "prompt_spec", "prompt_state", "class_names", "class_counts"}
    }
    atomic_torch_save(old, tmp_path / "c.pt")
    ckpt = RunCheckpoint.load(tmp_path / "c.pt")
    assert ckpt.epoch == 0 and ckpt.optimizer is None and ckpt.eval is None and ckpt.novel_class_names == []
    assert ckpt.best is None and ckpt.zero_shot is None


def test_bad_checkpoints_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        RunCheckpoint.load(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"junk\.pt is corrupt"):
        RunCheckpoint.load(tmp_path / "junk.pt")
    atomic_torch_save({"format": "other/1"}, tmp_path / "foreign.pt")
    with pytest.raises(UserError, match=r"foreign\.pt is not a flatprompt-run/1"):
        RunCheckpoint.load(tmp_path / "foreign.pt")
    atomic_torch_save({"format": CHECKPOINT_FORMAT, "config": {}}, tmp_path / "partial.pt")
    with pytest.raises(UserError, match=r"partial\.pt is incomplete"):
        RunCheckpoint.load(tmp_path / "partial.pt")


def test_summary_round_trips_and_reads_older_files(tmp_path: Path) -> None:
    summary = RunSummary(
        zero_shot=dict(HEADLINE),
        zero_shot_per_class=[0.1, 0.2, 0.3],
        final=dict(HEADLINE),
        eval=EvalReport.from_dict(_eval()),
        selection=Selection("last"),
        class_names=["red", "green", "blue"],
        class_counts=[150, 40, 5],
        data_check={"scanned_files": None, "skip_unreadable": False, "skipped_files": 0},
    )
    written = summary.write(tmp_path / "summary.json")
    assert written["selection"] == {"rule": "last"} and written["shot_thresholds"] == {
        "many_above": 100,
        "few_below": 20,
    }
    back = RunSummary.read(tmp_path / "summary.json")
    assert back.shot_rule == written["shot_rule"] and back.shot_thresholds == written["shot_thresholds"]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert to_jsonable(back.to_dict()) == {k: on_disk[k] for k in summary.to_dict()}
    assert back.eval.base.per_class[1] != back.eval.base.per_class[1]  # null read back as NaN
    # a summary from before zero-shot per class, selection and data_check were recorded
    old = {k: v for k, v in written.items() if k not in ("zero_shot_per_class", "selection", "data_check")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    older = RunSummary.read(tmp_path / "old.json")
    assert (
        older.zero_shot_per_class is None and older.selection == Selection("last") and older.data_check == {}
    )
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match=r"bad\.json is not valid JSON"):
        RunSummary.read(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserError, match=r"other\.json is not a flatprompt run summary"):
        RunSummary.read(tmp_path / "other.json")


def test_epoch_record_round_trips_and_reads_older_lines() -> None:
    line = {
        "epoch": 3,
        "train_loss": 0.5,
        "train_acc": 0.8,
        "lr": 0.01,
        "reweight_active": True,
        "noise_factor": 0.5,
        "skipped_steps": 0,
        "kg_distance": None,
        "seconds": 1.25,
        "eval": dict(HEADLINE),
        "val_mean_per_class": 0.7,
    }
    assert json.loads(EpochRecord.from_dict(line).to_json()) == line
    plain = {k: v for k, v in line.items() if k not in ("eval", "val_mean_per_class")}
    assert json.loads(EpochRecord.from_dict(plain).to_json()) == plain  # no eval keys on a non-eval epoch
    oldest = {"epoch": 1, "train_loss": 2.0, "train_acc": 0.1, "lr": 0.05}
    rec = EpochRecord.from_dict(oldest)
    assert rec.noise_factor is None and rec.skipped_steps == 0 and rec.reweight_active is False


def _function_lengths(root: Path) -> dict[str, int]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"{path.relative_to(root.parent)}:{node.lineno} {node.name}"
                out[key] = int(node.end_lineno or node.lineno) - node.lineno + 1
    return out


def test_fit_reads_as_prepare_plus_a_loop_and_no_trainer_function_is_long() -> None:
    lengths = _function_lengths(Path(__file__).parents[1] / "trainer")
    fit = [n for k, n in lengths.items() if k.startswith("trainer/runner.py:") and k.endswith(" fit")]
    assert fit == [n for n in fit if n <= 45] and len(fit) == 1, fit
    long = {k: n for k, n in lengths.items() if n >= 80}
    assert not long, long
