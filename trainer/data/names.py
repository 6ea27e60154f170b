"""Class-name cleaning, done in one place for every dataset.

Prompt learners put the class name into a sentence ("a photo of a {name}."), so every dataset turns its raw
names (CIFAR's ``aquarium_fish``, a folder called ``Golden_Retriever``, a names-file line) into the same clean
form: underscores become spaces, surrounding whitespace is stripped, runs of whitespace collapse to one space,
and the result is lower-cased unless ``keep_case`` is set (useful for proper nouns and species names).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from trainer.errors import UserError

_WHITESPACE = re.compile(r"\s+")


def clean_class_name(raw: str, keep_case: bool = False) -> str:
    """Return the clean form of one class name (``"Aquarium_fish "`` -> ``"aquarium fish"``)."""
    name = _WHITESPACE.sub(" ", raw.replace("_", " ")).strip()
    return name if keep_case else name.lower()


def clean_class_names(
    raw: Sequence[str],
    source: str,
    keep_case: bool = False,
    line_numbers: Sequence[int] | None = None,
) -> list[str]:
    """Clean every name and check the result is usable as a label space.

    Args:
        raw: the names in label order (``raw[i]`` is the name of label ``i``).
        source: the file or folder the names came from; it is named in every error.
        keep_case: keep the original letter case instead of lower-casing.
        line_numbers: when the names come from a text file, the 1-based line of each name, for the errors.

    Raises:
        UserError: a name is empty after cleaning, or two names clean to the same string.
    """
    names = [clean_class_name(r, keep_case) for r in raw]
    first_seen: dict[str, int] = {}
    for i, name in enumerate(names):
        where = f"{source}:{line_numbers[i]}" if line_numbers is not None else f"{source} (label {i})"
        if not name:
            raise UserError(f"{where}: class name {raw[i]!r} is empty after cleaning; give the class a name.")
        if name in first_seen:
            j = first_seen[name]
            other = f"line {line_numbers[j]}" if line_numbers is not None else f"label {j}"
            raise UserError(
                f"{where}: duplicate class name {name!r} (raw {raw[i]!r}; same as {other}, raw {raw[j]!r}); "
                "class names must be distinct after cleaning (underscores -> spaces, case folded) — rename one "
                "of them."
            )
        first_seen[name] = i
    return names
