"""Class-name and prompt-template validation and normalisation.

A class name is stored as the client wrote it after whitespace normalisation (Unicode NFC, leading
and trailing whitespace removed, internal runs of whitespace collapsed to one space). Two names are
the same class when their *keys* are equal; the key is the normalised name case-folded, because the
tokenizer lower-cases text anyway ("Okapi" and "okapi" would get the same embedding).

Any printable Unicode is allowed, including emoji and zero-width joiner sequences; control
characters (category ``Cc``), unpaired surrogates, private-use and unassigned code points are
refused, and so are the bidirectional embedding / override / isolate controls (U+202A..U+202E,
U+2066..U+2069), which make a name display as another one ("Trojan Source").
"""

from __future__ import annotations

import re
import unicodedata

from serving.errors import ServeError

_WHITESPACE = re.compile(r"\s+")
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn"})
_BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)))


def _forbidden(text: str) -> str | None:
    """The first character of ``text`` a name or template may not contain, or None."""
    return next(
        (ch for ch in text if ch in _BIDI_CONTROLS or unicodedata.category(ch) in _REFUSED_CATEGORIES), None
    )


PLACEHOLDER = "{}"


def clean_name(raw: object, max_length: int) -> str:
    """Validate and normalise one class name; raise :class:`ServeError` (4xx) when it is unusable."""
    if not isinstance(raw, str):
        raise ServeError(400, "invalid_name", "class names must be strings")
    name = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", raw)).strip()
    if not name:
        raise ServeError(400, "invalid_name", "class name is empty", limit="name_length")
    if len(name) > max_length:
        raise ServeError(
            400,
            "name_too_long",
            f"class name has {len(name)} characters, the limit is {max_length}",
            limit="name_length",
        )
    bad = _forbidden(name)
    if bad is not None:
        raise ServeError(400, "invalid_name", f"class name contains a forbidden character U+{ord(bad):04X}")
    return name


def name_key(name: str) -> str:
    """The identity of a (cleaned) class name: case-folded, so lookups ignore case."""
    return name.casefold()


def clean_template(raw: object, max_length: int) -> str:
    """Validate one prompt template: a string with exactly one ``{}`` placeholder for the class name."""
    if not isinstance(raw, str):
        raise ServeError(400, "invalid_template", "templates must be strings")
    template = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", raw)).strip()
    if len(template) > max_length:
        raise ServeError(
            400,
            "template_too_long",
            f"template has {len(template)} characters, the limit is {max_length}",
            limit="template_length",
        )
    if template.count(PLACEHOLDER) != 1:
        raise ServeError(400, "invalid_template", f"template {template!r} must contain exactly one '{{}}'")
    if _forbidden(template) is not None:
        raise ServeError(400, "invalid_template", "template contains a forbidden character")
    return template
