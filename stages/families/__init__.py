"""The model families this package knows, by name; any other family by its import path.

`get_family("deepfloyd-if")` and `get_family("decidiffusion")` are the registered families;
`get_family("package.module:ATTRIBUTE")` imports a family defined elsewhere (a plugin, or a test
module), as Ray Serve names an application. Replicas resolve the same string, so the module must be
importable where they run.
"""

from __future__ import annotations

import importlib

from stages.families.decidiffusion import DECIDIFFUSION
from stages.families.deepfloyd_if import DEEPFLOYD_IF
from stages.family import ModelFamily

FAMILIES: dict[str, ModelFamily] = {family.name: family for family in (DEEPFLOYD_IF, DECIDIFFUSION)}
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
