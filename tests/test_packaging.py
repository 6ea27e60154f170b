"""What ships with the package: every package-data glob in pyproject.toml matches files, the recipes among
them, and a recipe is found by name from any directory."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from trainer.config import RECIPES_DIR, load_config
from trainer.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_package_data_globs_match_files() -> None:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in data.items():
        for pattern in patterns:
            assert list((ROOT / package).glob(pattern)), f"{package}: {pattern} matches nothing"
    assert "recipes/*.yaml" in data["trainer"] and RECIPES_DIR == ROOT / "trainer" / "recipes"


def test_recipes_load_by_name_from_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no recipes/ here: the packaged ones are found
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert len(names) >= 10
    for name in names:
        assert (
            load_config(name)
            == load_config(f"recipes/{name}.yaml")
            == load_config(RECIPES_DIR / f"{name}.yaml")
        )
    with pytest.raises(UserError, match="packaged recipe"):
        load_config("no_such_recipe")
