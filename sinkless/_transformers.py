"""What differs between the transformers 5 releases sinkless supports (5.23 onwards), in one place.

transformers 5.25 renamed the KV-cache argument of every model's ``forward`` and of ``generate`` from
``past_key_values`` to ``cache`` (the old name stays accepted, with a deprecation warning, until 5.40 for
``forward`` and 6.0 for ``generate``), and the output field alike. Code that hands a model a cache, or
reads one from its inputs or outputs, goes through these helpers so it works on both sides of the rename.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["CACHE_NAMES", "cache_kwarg", "cache_in", "cache_of"]

CACHE_NAMES = ("cache", "past_key_values")
"""The names a model's cache goes by, newest first (transformers >= 5.25: ``cache``)."""


def cache_kwarg(model: nn.Module) -> str:
    """The keyword ``model``'s forward (and its ``generate``) takes the KV cache under."""
    parameters = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def cache_in(inputs: Mapping[str, Any]) -> Any:
    """The cache passed in a call's keyword inputs, under either name (None when there is none)."""
    for name in CACHE_NAMES:
        if inputs.get(name) is not None:
            return inputs[name]
    return None


def cache_of(output: Any) -> Any:
    """The cache a model returned in its output object, under either name (None when there is none)."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
