"""Write a family's preset as diffusers-format pipeline folders with random weights, all or nothing.

The family writes its folders (`ModelFamily.write_pipelines`) into a scratch folder inside `out`; they
are moved into place only once every one is written, so a failure or an interrupt never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from stages.family import ModelFamily


def write_checkpoints(
    family: ModelFamily,
    preset: str,
    out: str | Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
    safety_checker: bool = False,
) -> dict[str, Path]:
    """Write every pipeline folder of `family` under `out`; returns their paths by folder name.
    `safety_checker` adds the family's safety modules (a family without them refuses it)."""
    if family.write_pipelines is None or preset not in family.presets:
        known = ", ".join(family.presets) or "none"
        raise ValueError(f"preset: {family.name} has no preset {preset!r}; it has {known}")
    if safety_checker:
        family.check_option("safety_checker")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(dir=out, prefix=".writing-") as tmp:
        extra = {"safety_checker": True} if safety_checker else {}
        family.write_pipelines(preset, Path(tmp), dtype=dtype, variant=variant, progress=progress, **extra)
        final = {}
        for folder in family.folders:
            final[folder] = out / folder
            if final[folder].exists():
                shutil.rmtree(final[folder])
            (Path(tmp) / folder).rename(final[folder])
    return final
