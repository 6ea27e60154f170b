"""``python -m trainer report``: figures, the HTML page, the loss landscape, and the recipe files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import TINY_NAME
from tests.synthetic import synthetic_task
from trainer import runner
from trainer.cli import main
from trainer.config import load_config
from trainer.data import tasks
from trainer.landscape import (
    alpha_grid,
    filter_normalized_direction,
    prepare_run,
    scan_directions,
    subset_loss,
)

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def _fit(out: Path, *extra: str) -> Path:
    cfg = load_config(
        None,
        [
            f"model.name={TINY_NAME}",
            f"train.out_dir={out}",
            "train.epochs=2",
            "data.batch_size=8",
            "prompt.n_ctx=2",
            "prompt.vpt_length=2",
            "prompt.ctx_init=null",
            "optim.lr=0.05",
            "train.device=cpu",
            *extra,
        ],
    )
    return runner.fit(cfg, progress=False).out_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_clip):
    """Two tiny finished runs on the synthetic task: SGD, and GNM with DRW switching on at epoch 2."""
    mp = pytest.MonkeyPatch()
    mp.setattr(tasks, "task_from_config", lambda data, problems=None: synthetic_task())
    root = tmp_path_factory.mktemp("runs")
    a = _fit(root / "sgd", "train.epochs=1")
    b = _fit(root / "gnm", "optim.name=gnm", "reweight.name=drw", "reweight.start_epoch=1")
    yield a, b
    mp.undo()


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(
        tasks, "task_from_config", lambda data, problems=None: synthetic_task()
    )  # the landscape rebuilds the task
    out = tmp_path_factory.mktemp("report")
    args = ["report", *map(str, runs), "--out", str(out), "--landscape-directions", "2"]
    args += ["--landscape-points", "5", "--device", "cpu"]
    rc = main(args)
    mp.undo()
    assert rc == 0
    return out


def test_report_writes_figures_and_page(runs, report):
    html = (report / "report.html").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    expected = {"comparison.png", "landscape.png", "sharpness.png"}
    for slug in ("sgd", "gnm"):
        expected |= {f"{slug}_per_class.png", f"{slug}_curves.png", f"{slug}_reliability.png"}
    assert expected <= set(pngs)
    for name in pngs:
        assert (report / name).stat().st_size > 5000, name
        assert f'src="{name}"' in html, name
    for run_dir, label in zip(runs, ("sgd", "gnm+DRW"), strict=True):
        final = json.loads((run_dir / "summary.json").read_text())["final"]
        assert label in html
        for key in ("base_top1", "many", "medium", "few", "novel", "hm", "ece"):
            if final[key] is None:  # the synthetic task has only few-shot classes
                continue
            assert f"<td>{100 * final[key]:.2f}</td>" in html, (label, key)
    assert "zero-shot" in html and "sharpness" in html


def test_report_json_and_sharpness_are_finite(report):
    data = json.loads((report / "report.json").read_text())
    assert [r["run"] for r in data["table"]] == ["zero-shot", "sgd", "gnm+DRW"]
    assert len(data["landscape"]) == 2
    for lsc in data["landscape"]:
        assert math.isfinite(lsc["sharpness"]) and math.isfinite(lsc["max_rise"])
        assert lsc["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
        centre = lsc["alphas"].index(0.0)
        assert all(row[centre] == lsc["center_loss"] for row in lsc["losses"])
        assert lsc["max_rise"] >= 0.0


def test_landscape_centre_is_exact_and_prompts_are_restored(runs, monkeypatch):
    monkeypatch.setattr(tasks, "task_from_config", lambda data, problems=None: synthetic_task())
    prepared = prepare_run(runs[1], n_images=256, seed=0)
    model = prepared.model
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert set(before) == {"ctx", "visual_prompts.prompts"}
    plain = subset_loss(model, prepared.images, prepared.labels)
    result = scan_directions(model, prepared.images, prepared.labels, alphas=alpha_grid(5), n_directions=2)
    assert result.center_loss == plain  # alpha = 0 is the unperturbed prompts, bit for bit
    assert result.losses[:, 2].tolist() == [plain, plain]
    assert np.isfinite(result.losses).all() and math.isfinite(result.sharpness)
    assert result.losses[:, [0, 4]].std() > 0  # the perturbations did move the loss
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, before[n]), n  # bit-identical after the scan
    assert subset_loss(model, prepared.images, prepared.labels) == plain


def test_filter_normalised_rows_match_parameter_rows():
    theta = torch.randn(3, 4, 8)
    theta[1, 2] = 0.0
    d = filter_normalized_direction(theta, torch.Generator().manual_seed(0))
    assert torch.allclose(d.norm(dim=-1), theta.norm(dim=-1), atol=1e-5)
    assert torch.equal(d[1, 2], torch.zeros(8))


def test_missing_run_dir_is_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "metrics.jsonl").write_text("")
    assert main(["report", str(tmp_path / "half"), "--no-landscape"]) == 2
    assert "summary.json" in capsys.readouterr().err


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipes_load(path):
    cfg = load_config(path)
    assert cfg.train.epochs >= 1


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"toy_sgd.yaml", "toy_gnm_drw.yaml", "toy_gcsam_drw.yaml", "gcsam_coop_base2novel.yaml"} <= names


def test_zero_shot_per_class_is_recorded(runs):
    """fit records each base class's zero-shot accuracy (summary.json and per_class.csv), consistent with
    the zero-shot mean per class it reports."""
    import csv

    for run_dir in runs:
        summary = json.loads((run_dir / "summary.json").read_text())
        zs = summary["zero_shot_per_class"]
        assert len(zs) == len(summary["class_names"])
        finite = [v for v in zs if v is not None]
        assert sum(finite) / len(finite) == pytest.approx(summary["zero_shot"]["base_mean_per_class"])
        rows = list(csv.DictReader((run_dir / "per_class.csv").open()))
        assert [float(r["zero_shot_accuracy"]) if r["zero_shot_accuracy"] else None for r in rows] == [
            pytest.approx(v) if v is not None else None for v in zs
        ]
