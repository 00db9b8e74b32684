"""The seed document's reference diffusers code (shared/seeds/001_*), parameterised: the oracle that
every image this project makes is compared against."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from stages.params import GenerationParams, timestep_list


def load_reference(root) -> tuple[DiffusionPipeline, DiffusionPipeline, DiffusionPipeline]:
    stage_1 = DiffusionPipeline.from_pretrained(f"{root}/IF-I")
    stage_2 = DiffusionPipeline.from_pretrained(f"{root}/IF-II", text_encoder=None)
    stage_3 = DiffusionPipeline.from_pretrained(f"{root}/x4-upscaler")
    for pipe in (stage_1, stage_2, stage_3):
        pipe.set_progress_bar_config(disable=True)
    return stage_1, stage_2, stage_3


@torch.no_grad()
def reference_cascade(pipes, p: GenerationParams) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Images by size as (1, 3, H, W) tensors in [-1, 1], and the generator state after each stage;
    one generator goes through all three stages, as in the seed's code."""
    stage_1, stage_2, stage_3 = pipes
    generator = torch.Generator().manual_seed(p.seed)
    prompt_embeds, negative_embeds = stage_1.encode_prompt(p.prompt, negative_prompt=p.negative_prompt)
    out, states = {}, {}
    out[64] = stage_1(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        generator=generator,
        num_inference_steps=p.stage1_steps,
        timesteps=timestep_list(p.stage1_timesteps),
        guidance_scale=p.stage1_guidance,
        output_type="pt",
    ).images
    states[64] = generator.get_state()
    if p.size >= 256:
        out[256] = stage_2(
            image=out[64],
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
            generator=generator,
            num_inference_steps=p.stage2_steps,
            timesteps=timestep_list(p.stage2_timesteps),
            guidance_scale=p.stage2_guidance,
            noise_level=p.stage2_noise_level,
            output_type="pt",
        ).images
        states[256] = generator.get_state()
    if p.size >= 1024:
        # output_type="pt" returns [0, 1]; map back to [-1, 1] to compare like with like.
        image = stage_3(
            prompt=p.prompt,
            negative_prompt=p.negative_prompt,
            image=out[256],
            generator=generator,
            num_inference_steps=p.stage3_steps,
            guidance_scale=p.stage3_guidance,
            noise_level=p.stage3_noise_level,
            output_type="pt",
        ).images
        out[1024] = image * 2 - 1
        states[1024] = generator.get_state()
    return out, states
