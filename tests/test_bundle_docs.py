"""docs/bundle.md's manifest table against :class:`serving.runtime.manifest.Manifest` (both directions)."""

from __future__ import annotations

import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

from serving.runtime.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


def _field_names(cls: type, prefix: str = "") -> set[str]:
    """Every field of ``cls``, nested ones dotted (``graphs.<name>.fp32`` for a map of records; no ``extra``)."""
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in fields(cls):
        if f.name == "extra":
            continue
        name = prefix + f.name
        out.add(name)
        hint = hints[f.name]
        for arg in (hint,) if typing.get_origin(hint) is dict else (hint, *typing.get_args(hint)):
            if isinstance(arg, type) and is_dataclass(arg):
                out |= _field_names(arg, name + ".")
            elif typing.get_origin(arg) is dict:
                value = typing.get_args(arg)[1]
                if isinstance(value, type) and is_dataclass(value):
                    out |= _field_names(value, name + ".<name>.")
    return out


def _documented() -> set[str]:
    """The field names in the first column of the manifest table in docs/bundle.md's ``manifest.json`` section."""
    text = (ROOT / "docs" / "bundle.md").read_text(encoding="utf-8")
    section = text.split("## manifest.json", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        m = re.match(r"\|\s*`([A-Za-z0-9_.<>]+)`\s*\|", line)
        if m:
            names.add(m.group(1))
    return names


def test_docs_bundle_md_documents_every_manifest_field():
    missing = _field_names(Manifest) - _documented()
    assert not missing, f"docs/bundle.md's manifest table lacks {sorted(missing)}: add a row for each"


def test_docs_bundle_md_documents_no_field_that_does_not_exist():
    unknown = _documented() - _field_names(Manifest)
    assert not unknown, f"docs/bundle.md documents {sorted(unknown)}, which Manifest does not have"
