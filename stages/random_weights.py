"""A family's text encoder and stages over random weights built in memory, on the device, in the dtype:
what `profile_family(random_weights=True)` and `benchmarks/gpu/probe.py` measure without a checkpoint
folder (IF's full preset is about 45 GB on disk in float32; built on a GPU in float16 it never touches
the disk). The engines are the ones the loaders make from a folder, around the same pipeline classes, so
a step costs what it costs with the released weights; the models are initialised as their classes
initialise them and cast as loading casts them (float16 T5 keeps its float32 `wo` layers).

A family offers it with `ModelFamily.build_random`: `(preset, *, device, dtype, batch_invariant,
progress) -> (encoder, {stage: engine}, reference pipelines or None)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from stages.family import ModelFamily, StepEngine, TextEncoder


@dataclass
class RandomWeights:
    family: ModelFamily
    preset: str
    device: str
    dtype: torch.dtype
    encoder: TextEncoder
    stages: dict[str, StepEngine]  # in the family's order
    reference: Any = None  # the family's reference pipelines over the same models, where it has them
    build_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def cascade(self):
        """The in-process cascade (stages/cascade.py) over these engines."""
        from stages.cascade import Cascade

        return Cascade(self.family, self.encoder, self.stages)


def has_random_weights(family: ModelFamily) -> bool:
    return family.build_random is not None


def build_random(
    family: ModelFamily,
    preset: str,
    *,
    device: str = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    batch_invariant: bool | str = True,
    seed: int = 0,
    progress: Callable[[str], None] = lambda line: None,
) -> RandomWeights:
    """Every engine of `family`'s `preset` with random weights made on `device` (seeded by `seed`)."""
    if family.build_random is None:
        raise ValueError(f"random weights: {family.name} has no in-memory builder (ModelFamily.build_random)")
    if preset not in family.presets:
        raise ValueError(f"preset: {family.name} has no preset {preset!r}; it has {', '.join(family.presets)}")
    builder = family.build_random
    start = time.perf_counter()
    torch.manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        encoder, engines, reference = builder(
            preset, device=device, dtype=torch_dtype, batch_invariant=batch_invariant, progress=progress
        )
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    ordered = {spec.name: engines[spec.name] for spec in family.stages}
    return RandomWeights(
        family, preset, device, torch_dtype, encoder, ordered, reference, build_s=time.perf_counter() - start
    )
