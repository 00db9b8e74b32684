"""Write a DeciDiffusion preset as the published repository's pipeline folder, random weights:

    DIR/DeciDiffusion-v1-0   StableDiffusionPipeline   (CLIP tokenizer and text encoder, U-Net-NAS as
                                                       `unet`, SD-1.x VAE, the published DDIM scheduler)

diffusers saves it with its own pipeline class, and `model_index.json` names the denoiser by its
importable module and class (`stages.families.decidiffusion.unet`, `FlexibleUNet2DConditionModel`), so
`DiffusionPipeline.from_pretrained(DIR/DeciDiffusion-v1-0)` loads it without this project's loaders.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel

from stages.families.decidiffusion.presets import Preset, get_preset
from stages.families.decidiffusion.unet import FlexibleUNet2DConditionModel
from stages.tokenizers import keep_tokenizer_sources, train_clip_tokenizer

FOLDER = "DeciDiffusion-v1-0"  # the published repository's name (Deci/DeciDiffusion-v1-0)


def build_unet(preset: Preset) -> FlexibleUNet2DConditionModel:
    return FlexibleUNet2DConditionModel(preset.config("unet"))


def build_text_encoder(preset: Preset, vocab_size: int | None = None) -> CLIPTextModel:
    cfg = preset.config("text_encoder")
    if vocab_size is not None:
        cfg["vocab_size"] = vocab_size
    return CLIPTextModel(CLIPTextConfig(**cfg))


def build_vae(preset: Preset) -> AutoencoderKL:
    return AutoencoderKL(**{k: v for k, v in preset.config("vae").items() if not k.startswith("_")})


def build_scheduler(preset: Preset) -> DDIMScheduler:
    return DDIMScheduler.from_config({k: v for k, v in preset.config("scheduler").items() if k != "_class_name"})


def write_pipelines(
    preset_name: str,
    out: Path,
    *,
    dtype: torch.dtype = torch.float32,
    variant: str | None = None,
    progress: Callable[[str], None] = lambda message: None,
) -> None:
    """Write the pipeline folder into `out` (a scratch folder: `stages.checkpoints` moves it into place
    once written). Weights come from torch's global generator, seeded by the caller."""
    preset = get_preset(preset_name)
    clip_dir = out / "tokenizer-clip"
    tokenizer = train_clip_tokenizer(clip_dir, preset.clip_merges)
    progress(f"{FOLDER} ({preset.name}): CLIP text encoder + U-Net-NAS + VAE")
    pipe = StableDiffusionPipeline(
        vae=build_vae(preset),
        # `full` keeps the released embedding table; smaller presets size it to the trained tokenizer
        text_encoder=build_text_encoder(preset, None if preset.name == "full" else len(tokenizer)),
        tokenizer=tokenizer,
        unet=build_unet(preset),
        scheduler=build_scheduler(preset),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype != torch.float32:
        pipe = pipe.to(dtype)
    pipe.save_pretrained(out / FOLDER, safe_serialization=True, variant=variant)
    keep_tokenizer_sources(clip_dir, out / FOLDER, ("vocab.json", "merges.txt"))


def parameter_counts(preset_name: str) -> dict[str, int]:
    """Parameters per model, built on the meta device (no memory, no weights written)."""
    preset = get_preset(preset_name)
    builders = {
        "unet": lambda: build_unet(preset),
        "text_encoder": lambda: build_text_encoder(preset),
        "vae": lambda: build_vae(preset),
    }
    with torch.device("meta"):
        return {name: sum(p.numel() for p in build().parameters()) for name, build in builders.items()}
