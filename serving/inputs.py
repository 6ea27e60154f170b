"""Strict request parsing: unknown fields are refused by name, numbers are numbers.

BentoML builds each API's input model from the function signature with pydantic's defaults: extra
fields are ignored (a misspelt ``top-k`` or ``candidate`` silently does nothing) and numbers are
parsed in lax mode (``top_k=true`` in a form or ``{"top_k": true}`` in JSON is taken as 1,
``top_k=2.0`` as 2). :func:`enforce_strict_inputs` makes BentoML's multipart and JSON parsers validate
against a strict variant of each input model instead:

* ``extra="forbid"``: an unknown field answers 400, and the message names it
  (``invalid request: top-k: unknown field``);
* ``int`` fields take integers only (no booleans, no floats, no numeric strings in JSON); ``float``
  fields take numbers (integers included) but no booleans. Multipart values are JSON-decoded by
  BentoML first, so ``top_k=3`` in a form is still the integer 3.

The strict variant is a subclass of the original model (cached per model), so everything downstream of
the parser (attribute access, ``model_fields``, the OpenAPI document built from the original) is
unchanged.
"""

from __future__ import annotations

import copy
import logging
import types
import typing
from typing import Annotated, Any

_logger = logging.getLogger(__name__)

_STRICT_CACHE: dict[type, type] = {}
_NUMBERS = (int, float)


def _is_number(annotation: Any) -> bool:
    """True for ``int``/``float`` and ``int | None``/``float | None``."""
    if annotation in _NUMBERS:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return len(args) == 1 and args[0] in _NUMBERS
    return False


def strict_model(cls: type) -> type:
    """The strict variant of a pydantic input model (see the module docstring); cached."""
    cached = _STRICT_CACHE.get(cls)
    if cached is not None:
        return cached
    from pydantic import BaseModel, RootModel, Strict

    if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or issubclass(cls, RootModel):
        return cls
    namespace: dict[str, Any] = {
        "__module__": cls.__module__,
        "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__,
        "model_config": {**cls.model_config, "extra": "forbid"},
        "__annotations__": {},
    }
    for name, field in cls.model_fields.items():
        if _is_number(field.annotation):
            namespace["__annotations__"][name] = Annotated[field.annotation, Strict()]
            namespace[name] = copy.copy(field)
    variant: type = type(cls)(cls.__name__, (cls,), namespace)  # type: ignore[misc]
    _STRICT_CACHE[cls] = variant
    return variant


def enforce_strict_inputs() -> bool:
    """Patch BentoML 1.4's JSON and multipart parsers to validate with :func:`strict_model`.

    Idempotent. Returns False (and logs) when the private hooks are not where BentoML 1.4 has them.
    """
    try:
        from _bentoml_impl import serde
    except ImportError:
        _logger.warning("cannot make request parsing strict: BentoML's serde module moved")
        return False
    patched = True
    for cls in (serde.JSONSerde, serde.MultipartSerde):
        if "parse_request" not in vars(cls):
            _logger.warning("cannot make %s strict: its parse_request is gone", cls.__name__)
            patched = False
            continue
        if vars(cls).get("_flatprompt_strict", False):
            continue
        cls.parse_request = _strict_parse(cls.parse_request)
        cls._flatprompt_strict = True
    return patched


def _strict_parse(original: Any) -> Any:
    async def parse_request(self: Any, request: Any, cls: Any) -> Any:
        return await original(self, request, strict_model(cls))

    parse_request.__wrapped__ = original  # type: ignore[attr-defined]
    return parse_request
