"""The seed document's reference diffusers code (shared/seeds/001_*) for DeepFloyd IF, parameterised: the
oracle that every image this project makes is compared against (tests/reference.py re-exports it), and the
baseline `benchmarks/gpu/probe.py` times the cascade against.

It depends on nothing of the code under test: its defaults are the reference's own (each diffusers
pipeline's call defaults, and the `noise_level=100` the seed's code passes to stage III; test_family_if.py
checks them against both), and named timestep lists come from diffusers. A request's parameters are
read from what was set on it; everything else takes these defaults.
"""

from __future__ import annotations

import torch
from diffusers import (
    DiffusionPipeline,
    IFImg2ImgPipeline,
    IFImg2ImgSuperResolutionPipeline,
    IFInpaintingPipeline,
    IFInpaintingSuperResolutionPipeline,
)
from diffusers.pipelines.deepfloyd_if import timesteps as if_timesteps

REFERENCE_DEFAULTS = {
    "negative_prompt": None,
    "seed": 0,
    "size": 1024,
    "stage1_steps": 100,
    "stage1_timesteps": None,
    "stage1_guidance": 7.0,
    "stage2_steps": 50,
    "stage2_timesteps": None,
    "stage2_guidance": 4.0,
    "stage2_noise_level": 250,
    "stage3_steps": 75,
    "stage3_guidance": 9.0,
    "stage3_noise_level": 100,
}
# Edits: the seed's image-to-image and inpainting code calls these pipelines with their own defaults.
EDIT_DEFAULTS = {
    "image-to-image": {
        **REFERENCE_DEFAULTS,
        **{"stage1_steps": 80, "stage1_guidance": 10.0, "stage1_strength": 0.7, "stage2_strength": 0.8},
    },
    "inpainting": {
        **REFERENCE_DEFAULTS,
        **{"stage1_steps": 50, "stage1_guidance": 7.0, "stage1_strength": 1.0},
        **{"stage2_steps": 100, "stage2_noise_level": 0, "stage2_strength": 0.8},
    },
}


def load_reference(root) -> tuple[DiffusionPipeline, DiffusionPipeline, DiffusionPipeline]:
    stage_1 = DiffusionPipeline.from_pretrained(f"{root}/IF-I")
    stage_2 = DiffusionPipeline.from_pretrained(f"{root}/IF-II", text_encoder=None)
    stage_3 = DiffusionPipeline.from_pretrained(f"{root}/x4-upscaler")
    for pipe in (stage_1, stage_2, stage_3):
        pipe.set_progress_bar_config(disable=True)
    return stage_1, stage_2, stage_3


def _timesteps(name: str | None) -> list[int] | None:
    return None if name is None else list(getattr(if_timesteps, f"{name}_timesteps"))


def request_fields(params, defaults: dict = REFERENCE_DEFAULTS) -> dict:
    """The fields set on a request (a pydantic model or a mapping), over the reference's defaults."""
    fields = params if isinstance(params, dict) else {k: getattr(params, k) for k in params.model_fields_set}
    return {**defaults, **fields}


@torch.no_grad()
def reference_cascade(pipes, params, image=None, mask=None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Images by size as (1, 3, H, W) tensors in [-1, 1], and the generator state after each stage;
    one generator goes through all three stages, as in the seed's code. With a picture (`image`, PIL)
    it is the seed's image-to-image code; with a `mask` as well, its inpainting code."""
    stage_1, stage_2, stage_3 = pipes
    edit_1: dict = {}  # what the edit pipelines of stage I and stage II take besides the text-to-image call's
    edit_2: dict = {}
    if image is None:
        p = request_fields(params)
    elif mask is None:
        p = request_fields(params, EDIT_DEFAULTS["image-to-image"])
        stage_1, stage_2 = (
            IFImg2ImgPipeline(**stage_1.components),
            IFImg2ImgSuperResolutionPipeline(**stage_2.components),
        )
        edit_1, edit_2 = dict(image=image), dict(original_image=image)
    else:
        p = request_fields(params, EDIT_DEFAULTS["inpainting"])
        stage_1 = IFInpaintingPipeline(**stage_1.components)
        stage_2 = IFInpaintingSuperResolutionPipeline(**stage_2.components)
        edit_1, edit_2 = dict(image=image, mask_image=mask), dict(original_image=image, mask_image=mask)
    if image is not None:
        edit_1["strength"], edit_2["strength"] = p["stage1_strength"], p["stage2_strength"]
    for pipe in (stage_1, stage_2):
        pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(p["seed"])
    prompt_embeds, negative_embeds = stage_1.encode_prompt(p["prompt"], negative_prompt=p["negative_prompt"])
    out, states = {}, {}
    out[64] = stage_1(
        **edit_1,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        generator=generator,
        num_inference_steps=p["stage1_steps"],
        timesteps=_timesteps(p["stage1_timesteps"]),
        guidance_scale=p["stage1_guidance"],
        output_type="pt",
    ).images
    states[64] = generator.get_state()
    if p["size"] >= 256:
        out[256] = stage_2(
            **edit_2,
            image=out[64],
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            generator=generator,
            num_inference_steps=p["stage2_steps"],
            timesteps=_timesteps(p["stage2_timesteps"]),
            guidance_scale=p["stage2_guidance"],
            noise_level=p["stage2_noise_level"],
            output_type="pt",
        ).images
        states[256] = generator.get_state()
    if p["size"] >= 1024:
        # output_type="pt" returns [0, 1]; map back to [-1, 1] to compare like with like.
        image = stage_3(
            prompt=p["prompt"],
            negative_prompt=p["negative_prompt"],
            image=out[256],
            generator=generator,
            num_inference_steps=p["stage3_steps"],
            guidance_scale=p["stage3_guidance"],
            noise_level=p["stage3_noise_level"],
            output_type="pt",
        ).images
        out[1024] = image * 2 - 1
        states[1024] = generator.get_state()
    return out, states
