"""IF's safety checker and watermark on final images: the same pictures and flags as diffusers' own
pipelines given the same three components (the seed's code hands stage I's to the x4 upscaler), for an
image the tiny checker passes and one it flags; switched on per cascade or deployment."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline

from stages.cascade import Cascade
from stages.errors import CheckpointError
from stages.families import DEEPFLOYD_IF
from stages.families.deepfloyd_if import GenerationParams
from stages.families.deepfloyd_if.safety import SafetyFilter

FAST = dict(stage1_steps=5, stage2_steps=3, stage3_steps=3)


@pytest.fixture(scope="module")
def safe_cascade(safety_checkpoints):
    return Cascade.from_checkpoints(safety_checkpoints, safety_checker=True)


@pytest.fixture(scope="module")
def modules(safe_cascade):
    """The components the cascade loaded, handed to diffusers' pipelines as the seed's code does."""
    safety = safe_cascade.stages["stage1"].safety
    return {
        "feature_extractor": safety.feature_extractor,
        "safety_checker": safety.checker,
        "watermarker": safety.watermarker,
    }


@pytest.fixture
def flagging(safe_cascade):
    """The tiny checker, made to flag everything (its NSFW head's bias raised over the threshold), in
    every stage (each loads its own; stage I's is the one handed to the reference pipelines)."""
    biases = [stage.safety.checker.p_head.bias for stage in safe_cascade.stages.values()]
    before = [bias.detach().clone() for bias in biases]
    for bias in biases:
        bias.data.fill_(10.0)
    yield
    for bias, value in zip(biases, before, strict=True):
        bias.data.copy_(value)


def reference_pictures(root, modules, params: GenerationParams):
    """The seed's code with the safety modules: stage I's picture at 64 px (output_type="pil") and the
    upscaler's at 1024 px, one generator through the three stages."""
    stage_1 = DiffusionPipeline.from_pretrained(f"{root}/IF-I", **modules)
    stage_2 = DiffusionPipeline.from_pretrained(f"{root}/IF-II", text_encoder=None)
    stage_3 = DiffusionPipeline.from_pretrained(f"{root}/x4-upscaler", **modules)
    for pipe in (stage_1, stage_2, stage_3):
        pipe.set_progress_bar_config(disable=True)
    embeds, negative = stage_1.encode_prompt(params.prompt)
    run_1 = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=params.stage1_steps)
    pil_64 = stage_1(**run_1, generator=torch.Generator().manual_seed(params.seed))
    generator = torch.Generator().manual_seed(params.seed)
    image = stage_1(**run_1, generator=generator, output_type="pt").images
    image = stage_2(
        image=image,
        prompt_embeds=embeds,
        negative_prompt_embeds=negative,
        generator=generator,
        num_inference_steps=params.stage2_steps,
        output_type="pt",
    ).images
    upscale = dict(prompt=params.prompt, image=image, generator=generator, noise_level=100)
    return pil_64, lambda: stage_3(**upscale, num_inference_steps=params.stage3_steps)


def _pixels(picture) -> np.ndarray:
    return np.asarray(picture, dtype=np.int16)


def test_final_pictures_equal_diffusers_with_the_safety_modules(safe_cascade, safety_checkpoints, modules, cascade):
    params = GenerationParams(prompt="a lighthouse", seed=4, **FAST)
    pil_64, upscale = reference_pictures(safety_checkpoints, modules, params)
    ours_64 = safe_cascade.generate(params.model_copy(update={"size": 64}))
    assert np.array_equal(_pixels(ours_64.image), _pixels(pil_64.images[0]))
    assert ours_64.nsfw_detected is False and ours_64.watermark_detected is False
    assert pil_64.nsfw_detected == [False]

    reference_1024 = upscale()
    ours = safe_cascade.generate(params)
    assert np.array_equal(_pixels(ours.image), _pixels(reference_1024.images[0]))
    assert reference_1024.nsfw_content_detected == [False] and ours.nsfw_detected is False
    # The watermark is there: the same request without the checker differs only in its corner.
    plain = _pixels(cascade.generate(params).image)  # the session's cascade, loaded without the checker
    changed = np.argwhere(np.abs(plain - _pixels(ours.image)).max(axis=-1) > 0)
    assert len(changed) > 0 and changed.min() >= 1024 - 14 - 62 - 1


def test_a_flagged_image_is_black_and_flagged_as_diffusers_does(safe_cascade, safety_checkpoints, modules, flagging):
    params = GenerationParams(prompt="a lighthouse", seed=4, size=64, **FAST)
    pil_64, upscale = reference_pictures(safety_checkpoints, modules, params)
    ours = safe_cascade.generate(params)
    assert pil_64.nsfw_detected == [True] and ours.nsfw_detected is True
    black_but_watermark = _pixels(pil_64.images[0])
    assert np.array_equal(_pixels(ours.image), black_but_watermark)
    assert (black_but_watermark[:48, :48] == 0).all()
    # At 1024 px diffusers' upscale pipeline cannot black out an image IF's checker flags (it assigns a
    # numpy array into a torch tensor); ours blacks it out as IF's own pipelines do, and says so.
    with pytest.raises(TypeError):
        upscale()
    flagged = safe_cascade.generate(params.model_copy(update={"size": 1024}))
    assert flagged.nsfw_detected is True
    assert (_pixels(flagged.image)[:900, :900] == 0).all()


def test_the_checker_needs_its_components(tiny_checkpoints):
    with pytest.raises(CheckpointError, match="model.safety_checker: .* has no feature_extractor"):
        SafetyFilter.load(tiny_checkpoints / "IF-I")
    # Without it, the stages load from a folder that has them as from one that has not.
    engine = DEEPFLOYD_IF.load_stage("stage1", tiny_checkpoints)
    assert engine.safety is None
