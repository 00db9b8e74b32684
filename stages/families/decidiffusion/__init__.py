"""DeciDiffusion 1.0: a latent text-to-image model in Stable Diffusion 1.x's mould, CLIP ViT-L/14 text
encoder -> U-Net-NAS denoiser (64 x 64 latents, step-batched) -> SD-1.x VAE decode (512 px).

Everything DeciDiffusion-specific is in this package: the denoiser (`unet.py`), its stage (`latent_stage.py`),
the request parameters with the card's and diffusers' defaults, the loaders, the presets and the
checkpoint writer. Its one pipeline folder is what `StableDiffusionPipeline` loads, so the seed-style
reference for it is diffusers' own pipeline with this denoiser as its `unet`.
"""

from __future__ import annotations

from pydantic import Field

from stages.encoding import PipelineTextEncoder
from stages.families.decidiffusion.checkpoints import FOLDER, write_pipelines
from stages.families.decidiffusion.latent_stage import LatentStage
from stages.families.decidiffusion.presets import PRESETS
from stages.family import ModelFamily, StageSpec
from stages.loading import load_pipeline
from stages.params import Guidance, StageParams, Steps, request_params

PIPELINE = ("StableDiffusionPipeline",)
_UNUSED = ("safety_checker", "feature_extractor", "image_encoder")  # published without them


class DenoiserParams(StageParams):
    steps: Steps = Field(30, description="denoising steps (the card's 30)")
    guidance: Guidance = Field(7.5, description="guidance scale (StableDiffusionPipeline's 7.5)")


GenerationParams = request_params("GenerationParams", {"denoiser": DenoiserParams}, sizes=(512,), module=__name__)


def load_text_encoder(path, *, batch_invariant: bool = True, **kw) -> PipelineTextEncoder:
    """CLIP from the pipeline folder, its denoiser and VAE left out."""
    pipe = load_pipeline(path, expect=PIPELINE, exclude=("unet", "vae", *_UNUSED), param="text_encoder", **kw)
    return PipelineTextEncoder(pipe, batch_invariant)


def load_denoiser(path, *, name: str = "denoiser", batch_invariant: bool = True, **kw) -> LatentStage:
    pipe = load_pipeline(path, expect=PIPELINE, exclude=("text_encoder", *_UNUSED), param=name, **kw)
    return LatentStage(pipe, batch_invariant, name)


DECIDIFFUSION = ModelFamily(
    name="decidiffusion",
    encoder_folder=FOLDER,
    encoder_title="CLIPTextEncoder",
    load_encoder=load_text_encoder,
    stages=(StageSpec("denoiser", "UNetNAS", FOLDER, 512, uses_embeddings=True, load=load_denoiser),),
    params=GenerationParams,
    presets=PRESETS,
    write_pipelines=write_pipelines,
    quick_params={"denoiser_steps": 10},
)

__all__ = ["DECIDIFFUSION", "GenerationParams"]
