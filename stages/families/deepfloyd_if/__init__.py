"""DeepFloyd IF: a frozen T5 text encoder, stage I (text -> 64 px), stage II (64 -> 256 px) and
Stability's x4 upscaler as stage III (256 -> 1024 px, with its own CLIP text encoder and VAE).

Everything IF-specific is in this package: the pipeline folders and stage list (`DEEPFLOYD_IF`), the
request parameters with the reference's defaults (`GenerationParams`), the loaders, the checkpoint
limits, the presets (`presets.py`) and the checkpoint writer (`checkpoints.py`).
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers.pipelines.deepfloyd_if import timesteps as _if_timesteps
from pydantic import Field

from stages.encoding import PipelineTextEncoder
from stages.families.deepfloyd_if.checkpoints import FOLDERS, write_pipelines
from stages.families.deepfloyd_if.pixel_stages import StageI, StageII
from stages.families.deepfloyd_if.presets import PRESETS
from stages.families.deepfloyd_if.safety import COMPONENTS as SAFETY
from stages.families.deepfloyd_if.safety import SafetyFilter
from stages.families.deepfloyd_if.upscaler import StageIII
from stages.family import ModelFamily, StageSpec, TaskKind
from stages.loading import load_pipeline
from stages.params import Guidance, NoiseLevel, StageParams, Steps, Strength, request_params

# Named timestep lists shipped with diffusers (fast27, smart50, super100, ...).
TIMESTEP_LISTS: dict[str, list[int]] = {
    name.removesuffix("_timesteps"): list(getattr(_if_timesteps, name))
    for name in dir(_if_timesteps)
    if name.endswith("_timesteps")
}
_LISTS = ", ".join(sorted(TIMESTEP_LISTS))


# The defaults are those of the seed's reference code: each pipeline's own call defaults, and stage III's
# noise_level=100 as the reference passes it (tests/test_family_if.py checks them against both).
class StageIParams(StageParams):
    TIMESTEP_LISTS = TIMESTEP_LISTS
    steps: Steps = Field(100, description="stage I denoising steps")
    timesteps: str | None = Field(None, description=f"stage I named timestep list: {_LISTS}")
    guidance: Guidance = Field(7.0, description="stage I guidance scale")


class StageIIParams(StageParams):
    TIMESTEP_LISTS = TIMESTEP_LISTS
    steps: Steps = Field(50, description="stage II denoising steps")
    timesteps: str | None = Field(None, description="stage II named timestep list")
    guidance: Guidance = Field(4.0, description="stage II guidance scale")
    noise_level: NoiseLevel = Field(250, description="stage II noise added to the 64 px image, [0, 1000)")


class StageIIIParams(StageParams):
    steps: Steps = Field(75, description="stage III denoising steps")
    guidance: Guidance = Field(9.0, description="stage III guidance scale")
    noise_level: NoiseLevel = Field(100, description="stage III noise added to the 256 px image, [0, 350]")


GenerationParams = request_params(
    "GenerationParams",
    {"stage1": StageIParams, "stage2": StageIIParams, "stage3": StageIIIParams},
    sizes=(64, 256, 1024),
    module=__name__,
)


# Edits: the defaults of diffusers' IFImg2Img*/IFInpainting* pipelines' calls, which the seed's reference
# code uses; stage III is the same x4 upscaler call as for text-to-image.
class Img2ImgStageIParams(StageIParams):
    steps: Steps = Field(80, description="stage I denoising steps (before strength)")
    guidance: Guidance = Field(10.0, description="stage I guidance scale")
    strength: Strength = Field(0.7, description="stage I: how much of the picture is redrawn, (0, 1]")


class Img2ImgStageIIParams(StageIIParams):
    strength: Strength = Field(0.8, description="stage II: how much of the picture is redrawn, (0, 1]")


class InpaintStageIParams(StageIParams):
    steps: Steps = Field(50, description="stage I denoising steps (before strength)")
    guidance: Guidance = Field(7.0, description="stage I guidance scale")
    strength: Strength = Field(1.0, description="stage I: how much of the masked area is redrawn, (0, 1]")


class InpaintStageIIParams(StageIIParams):
    steps: Steps = Field(100, description="stage II denoising steps (before strength)")
    noise_level: NoiseLevel = Field(0, description="stage II noise added to the 64 px image, [0, 1000)")
    strength: Strength = Field(0.8, description="stage II: how much of the masked area is redrawn, (0, 1]")


Img2ImgParams = request_params(
    "Img2ImgParams",
    {"stage1": Img2ImgStageIParams, "stage2": Img2ImgStageIIParams, "stage3": StageIIIParams},
    sizes=(64, 256, 1024),
    module=__name__,
)
InpaintParams = request_params(
    "InpaintParams",
    {"stage1": InpaintStageIParams, "stage2": InpaintStageIIParams, "stage3": StageIIIParams},
    sizes=(64, 256, 1024),
    module=__name__,
)


def load_text_encoder(
    path, *, batch_invariant: bool | str = True, safety_checker: bool = False, **kw
) -> PipelineTextEncoder:
    """T5 from the stage I folder (its UNet left out), in `torch_dtype` (the config's
    `model.text_encoder_dtype`, else `model.dtype`). transformers 5 keeps the modules a model names in
    `_keep_in_fp32_modules` (T5: the feed-forward output layers `wo`) in float32 when it loads in float16,
    and nothing in bfloat16 (only `_keep_in_fp32_modules_strict`, which T5 has none of): T5-v1.1-XXL's
    encoder is ~11.5 GB in float16 and ~9.5 GB in bfloat16 (stages/estimates.py `weights_bytes`).
    `batch_invariant`: a mode ("split", "per_task", "off") or the older bool."""
    pipe = load_pipeline(path, expect=("IFPipeline",), exclude=("unet", *SAFETY), param="text_encoder", **kw)
    return PipelineTextEncoder(pipe, batch_invariant)


def _with_safety(stage, path, safety_checker: bool, kw: dict):
    """With `safety_checker`, the stage's final pictures pass IF's checker and watermark, which the seed's
    code takes from stage I's pipeline for every stage (safety.py)."""
    if safety_checker:
        folder = Path(path).parent / FOLDERS["stage1"]
        stage.safety = SafetyFilter.load(folder, torch_dtype=kw.get("torch_dtype"), device=kw.get("device", "cpu"))
    return stage


def load_stage1(path, *, name: str = "stage1", batch_invariant: bool | str = True, safety_checker: bool = False, **kw):
    pipe = load_pipeline(path, expect=("IFPipeline",), exclude=("text_encoder", *SAFETY), param=name, **kw)
    return _with_safety(StageI(pipe, batch_invariant, name), path, safety_checker, kw)


def load_stage2(path, *, name: str = "stage2", batch_invariant: bool | str = True, safety_checker: bool = False, **kw):
    expect = ("IFSuperResolutionPipeline",)
    pipe = load_pipeline(path, expect=expect, exclude=("text_encoder", *SAFETY), param=name, **kw)
    return _with_safety(StageII(pipe, batch_invariant, name), path, safety_checker, kw)


def load_stage3(path, *, name: str = "stage3", batch_invariant: bool | str = True, safety_checker: bool = False, **kw):
    expect = ("StableDiffusionUpscalePipeline",)
    pipe = load_pipeline(path, expect=expect, exclude=SAFETY, param=name, **kw)
    return _with_safety(StageIII(pipe, batch_invariant, name), path, safety_checker, kw)


def _limits(root: Path) -> dict[str, float]:
    index = Path(root) / FOLDERS["stage3"] / "model_index.json"
    try:
        return {"stage3_noise_level": json.loads(index.read_text())["max_noise_level"]}
    except (OSError, ValueError, KeyError):
        return {}  # the stage itself still refuses it


def _random_engines(preset: str, **kw):
    from stages.families.deepfloyd_if.checkpoints import random_engines

    return random_engines(preset, **kw)


def _estimate_calls(preset: str, dtype: str, encoder_dtype: str) -> dict:
    from stages.families.deepfloyd_if.estimate import estimate_calls

    return estimate_calls(preset, dtype, encoder_dtype)


DEEPFLOYD_IF = ModelFamily(
    name="deepfloyd-if",
    encoder_folder=FOLDERS["stage1"],
    load_encoder=load_text_encoder,
    stages=(
        StageSpec("stage1", "StageI", FOLDERS["stage1"], 64, uses_embeddings=True, load=load_stage1, edits=True),
        StageSpec("stage2", "StageII", FOLDERS["stage2"], 256, uses_embeddings=True, load=load_stage2, edits=True),
        StageSpec("stage3", "StageIII", FOLDERS["stage3"], 1024, uses_embeddings=False, load=load_stage3),
    ),
    params=GenerationParams,
    presets=PRESETS,
    write_pipelines=write_pipelines,
    checkpoint_limits=_limits,
    # IF's own 27-step list for stage I, 10 steps for stages II and III.
    quick_params={"stage1_timesteps": "fast27", "stage2_steps": 10, "stage3_steps": 10},
    edit_kinds=(
        TaskKind("image-to-image", Img2ImgParams, image=True),
        TaskKind("inpainting", InpaintParams, image=True, mask=True),
    ),
    options=("safety_checker",),
    build_random=_random_engines,
    estimate_calls=_estimate_calls,
)

__all__ = ["DEEPFLOYD_IF", "GenerationParams", "Img2ImgParams", "InpaintParams", "TIMESTEP_LISTS"]
