"""The model families this package knows, by name; any other family by its import path.

`get_family("deepfloyd-if")` is the registered family; `get_family("package.module:ATTRIBUTE")` imports
a family defined elsewhere (a plugin, or a test module), as Ray Serve names an application. Replicas
resolve the same string, so the module must be importable where they run.
"""

from __future__ import annotations

import importlib

from stages.families.deepfloyd_if import DEEPFLOYD_IF
from stages.family import ModelFamily

FAMILIES: dict[str, ModelFamily] = {DEEPFLOYD_IF.name: DEEPFLOYD_IF}
DEFAULT_FAMILY = DEEPFLOYD_IF.name


def get_family(name: str) -> ModelFamily:
    if name in FAMILIES:
        return FAMILIES[name]
    module, sep, attribute = name.partition(":")
    if not sep:
        raise ValueError(
            f"family: unknown model family {name!r}; known: {', '.join(FAMILIES)} (or `package.module:ATTRIBUTE`)"
        )
    try:
        family = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"family: cannot import {name!r}: {err}") from None
    if not isinstance(family, ModelFamily):
        raise ValueError(f"family: {name!r} is a {type(family).__name__}, not a ModelFamily")
    return family
