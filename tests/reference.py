"""The oracles: the seed document's reference diffusers code for DeepFloyd IF (stages/reference.py, which
`benchmarks/gpu/probe.py` also times), and diffusers' `StableDiffusionPipeline` for DeciDiffusion.

Neither depends on the code under test: their defaults are the reference's own (test_family_if.py checks
IF's against both the reference and the request model).
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from stages.reference import (
    EDIT_DEFAULTS,
    REFERENCE_DEFAULTS,
    load_reference,
    reference_cascade,
    request_fields,
)

__all__ = [
    "EDIT_DEFAULTS",
    "LATENT_DEFAULTS",
    "REFERENCE_DEFAULTS",
    "latent_reference",
    "load_latent_reference",
    "load_reference",
    "reference_cascade",
    "request_fields",
]

# ---- DeciDiffusion ----------------------------------------------------------------------------------
# diffusers' `StableDiffusionPipeline` with the U-Net-NAS as its `unet` is the reference: its own call,
# driven with the request's prompt, steps, guidance and seed, with its own defaults otherwise (the card's
# 30 steps for num_inference_steps, which the pipeline's own default, 50, is not).
LATENT_DEFAULTS = {"negative_prompt": None, "seed": 0, "denoiser_steps": 30, "denoiser_guidance": 7.5}


def load_latent_reference(folder) -> DiffusionPipeline:
    import stages.families.decidiffusion.unet  # noqa: F401 - diffusers loads only a component module already imported

    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def latent_reference(pipe, params):
    """The reference pipeline's PIL image for a DeciDiffusion request."""
    p = request_fields(params, LATENT_DEFAULTS)
    return pipe(
        p["prompt"],
        negative_prompt=p["negative_prompt"],
        num_inference_steps=p["denoiser_steps"],
        guidance_scale=p["denoiser_guidance"],
        generator=torch.Generator().manual_seed(p["seed"]),
    ).images[0]
