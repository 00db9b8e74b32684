"""DeepFloyd IF's request defaults are the reference's: the seed document's code passes no steps or
guidance, so each pipeline's own call defaults apply, and it passes `noise_level=100` to stage III.
The values are pinned here, checked against diffusers' signatures and the seed text, and the family's
defaults (what the engine, the HTTP API and the CLI use) must equal them."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
from diffusers import IFPipeline, IFSuperResolutionPipeline, StableDiffusionUpscalePipeline

from stages.families.deepfloyd_if import GenerationParams
from tests.reference import REFERENCE_DEFAULTS

SEED = Path(__file__).resolve().parents[2] / "shared" / "seeds"

# stage I 100 steps / 7.0, stage II 50 / 4.0 / noise 250, stage III 75 / 9.0 / noise 100.
PINNED = {
    "stage1_steps": 100,
    "stage1_guidance": 7.0,
    "stage2_steps": 50,
    "stage2_guidance": 4.0,
    "stage2_noise_level": 250,
    "stage3_steps": 75,
    "stage3_guidance": 9.0,
    "stage3_noise_level": 100,
}


def _call_default(pipeline, name: str):
    return inspect.signature(pipeline.__call__).parameters[name].default


def test_pinned_defaults_are_the_diffusers_pipelines_own():
    for prefix, pipeline in (("stage1", IFPipeline), ("stage2", IFSuperResolutionPipeline)):
        assert _call_default(pipeline, "num_inference_steps") == PINNED[f"{prefix}_steps"]
        assert _call_default(pipeline, "guidance_scale") == PINNED[f"{prefix}_guidance"]
    assert _call_default(IFSuperResolutionPipeline, "noise_level") == PINNED["stage2_noise_level"]
    assert _call_default(StableDiffusionUpscalePipeline, "num_inference_steps") == PINNED["stage3_steps"]
    assert _call_default(StableDiffusionUpscalePipeline, "guidance_scale") == PINNED["stage3_guidance"]


@pytest.mark.skipif(not SEED.is_dir(), reason="shared/seeds is not beside this checkout")
def test_stage_three_noise_level_is_what_the_seed_code_passes():
    text = next(p for p in sorted(SEED.glob("001_*.txt"))).read_text()
    calls = re.findall(r"stage_3\(([^)]*)\)", text)
    levels = {int(m) for call in calls for m in re.findall(r"noise_level=(\d+)", call)}
    assert calls and levels == {PINNED["stage3_noise_level"]}
    # ...and the text-to-image calls pass no steps or guidance that would override a pipeline default.
    first = text.split("stage_1_output = stage_1(")[1].split(").images")[0]
    assert "num_inference_steps" not in first and "guidance_scale" not in first


def test_family_defaults_equal_the_reference():
    defaults = {name: info.default for name, info in GenerationParams.model_fields.items()}
    assert {k: defaults[k] for k in PINNED} == PINNED
    assert {k: REFERENCE_DEFAULTS[k] for k in PINNED} == PINNED  # the oracle's own copy
    assert defaults["size"] == 1024 and defaults["stage1_timesteps"] is None


def test_stage_groups_read_back_from_the_flat_fields():
    params = GenerationParams(prompt="a", stage2_noise_level=17, stage1_timesteps="fast27")
    group = params.stage("stage2")
    assert (group.steps, group.guidance, group.noise_level) == (50, 4.0, 17)
    order = params.stage("stage1").work_order()
    assert order["steps"] == 100 and len(order["timesteps"]) == 27 and order["noise_level"] is None
