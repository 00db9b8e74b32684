"""What every family's presets share: the real architecture's configs, shipped as JSON in the family's
`configs/full/` package, and smaller presets as overrides on top of them."""

from __future__ import annotations

import copy
import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def _read(package: str, filename: str) -> dict[str, Any]:
    return json.loads(resources.files(package).joinpath(filename).read_text())


def scaled_configs(
    package: str, files: dict[str, str], presets: dict[str, dict[str, dict[str, Any]]], name: str
) -> dict[str, dict[str, Any]]:
    """Each component's full config (`files`: component -> file in `package`), updated with preset
    `name`'s overrides; a copy, so the cached originals stay the real configs."""
    if name not in presets:
        raise ValueError(f"preset: unknown preset {name!r}; choose one of {', '.join(presets)}")
    configs = {}
    for component, filename in files.items():
        configs[component] = {**copy.deepcopy(_read(package, filename)), **presets[name].get(component, {})}
    return configs
