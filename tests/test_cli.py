"""The CLI's contract: user mistakes end in one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_CONFIG
from trainer.cli import main


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """`fit` without --out writes to runs/toy: keep that out of the repository (and away from a real run)."""
    monkeypatch.chdir(tmp_path)


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["fit", "--set", "optim.name=adam"], "optim.name"),
        (["fit", "--set", "model.name=no-such-model"], "unknown open_clip model 'no-such-model'"),
        (
            [
                "fit",
                "--set",
                "model.name=tiny-clip",
                "--set",
                "model.pretrained=/nonexistent/w.pt",
                "--set",
                f"model.config_path={TINY_CONFIG}",
            ],
            "does not exist",
        ),
        (["fit", "-c", "/nonexistent.yaml"], "does not exist"),
        (["evaluate", "--checkpoint", "/nonexistent/checkpoint.pt"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_line(capsys, argv, needle):
    code, err = _run(capsys, argv)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ")
    assert needle in err[0]


def test_corrupt_weights_file(tmp_path, capsys):
    bad = tmp_path / "weights.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, err = _run(
        capsys,
        [
            "fit",
            "--set",
            "model.name=tiny-clip",
            "--set",
            f"model.config_path={TINY_CONFIG}",
            "--set",
            f"model.pretrained={bad}",
        ],
    )
    assert code == 2 and "corrupt" in err[0] and str(bad) in err[0]


def test_weights_of_another_model(tmp_path, capsys, tiny_clip):
    import torch

    other = tmp_path / "other.pt"
    torch.save({"visual.proj": torch.zeros(3, 3)}, other)
    code, err = _run(
        capsys,
        [
            "fit",
            "--set",
            "model.name=tiny-clip",
            "--set",
            f"model.config_path={TINY_CONFIG}",
            "--set",
            f"model.pretrained={other}",
        ],
    )
    assert code == 2 and "does not fit model 'tiny-clip'" in err[0]


def test_empty_image_folder(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code, err = _run(
        capsys,
        [
            "fit",
            "--set",
            "data.kind=imagefolder",
            "--set",
            f"data.root={tmp_path / 'data'}",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert code == 2 and str(tmp_path / "data") in err[0]
