"""DeciDiffusion, the second family: its U-Net-NAS built from the published configuration (parameter
counts, block layout and weight names), its pipeline folder loaded by diffusers alone, its defaults,
and its images equal to diffusers' `StableDiffusionPipeline` with that denoiser as `unet`, alone and
sharing batched steps; the `ifserve` commands with `--family decidiffusion`."""

from __future__ import annotations

import inspect
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline, StableDiffusionPipeline

from stages.cascade import Cascade
from stages.errors import InvalidParameter
from stages.families import get_family
from stages.families.decidiffusion import GenerationParams
from stages.families.decidiffusion.checkpoints import FOLDER, build_unet, parameter_counts
from stages.families.decidiffusion.presets import get_preset
from stages.families.decidiffusion.unet import FlexibleUNet2DConditionModel
from tests.reference import latent_reference
from tests.serving import pixels, torch_threads

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
FACTS = SHARED / "reference" / "decidiffusion.md"
PUBLISHED = SHARED / "reference" / "full-configs"


@pytest.fixture(scope="module")
def deci(deci_checkpoints):
    return Cascade.from_checkpoints(deci_checkpoints, family="decidiffusion")


def test_full_preset_has_the_published_parameter_counts():
    assert parameter_counts("full") == {"unet": 814_746_884, "text_encoder": 123_060_480, "vae": 83_653_863}
    if FACTS.is_file():  # the facts sheet beside the repository says the same
        facts = FACTS.read_text()
        for count in ("814,746,884", "123,060,480", "83,653,863"):
            assert count in facts


def test_full_configs_are_the_published_ones():
    if not PUBLISHED.is_dir():
        pytest.skip(f"{PUBLISHED} is not beside this checkout (it holds the published configs)")
    preset = get_preset("full")
    assert preset.config("unet") == json.loads(
        (PUBLISHED / "decidiffusion-v1.flexible_unet.configurations.json").read_text()
    )
    assert preset.config("scheduler") == json.loads((PUBLISHED / "decidiffusion-v1.scheduler.json").read_text())


def _kinds(modules) -> str:
    return "".join("A" if type(m).__name__ == "Transformer2DModel" else "R" for m in modules)


def test_denoiser_layout_and_weight_names_are_the_published_ones():
    with torch.device("meta"):
        unet = build_unet(get_preset("full"))
    # R: resnet, A: transformer block, in the order they run (decidiffusion.md)
    assert [_kinds(b.modules_list) for b in unet.down_blocks] == ["RR", "RAR", "RAAA"]
    assert _kinds(unet.mid_block.modules_list) == "RARARRR"
    assert [_kinds(b.modules_list) for b in unet.up_blocks] == ["RARAAAAA", "RARARA", "RRR"]
    assert [b.downsamplers is not None for b in unet.down_blocks] == [True, True, True]
    assert [b.upsamplers is not None for b in unet.up_blocks] == [True, True, False]
    names = set(unet.state_dict())
    for name in (
        "conv_in.weight",
        "time_embedding.linear_2.weight",
        "down_blocks.1.modules_list.1.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.2.downsamplers.0.conv.weight",
        "mid_block.modules_list.6.conv2.weight",
        "mid_block.upsamplers.0.conv.weight",
        "up_blocks.0.modules_list.7.proj_out.weight",
        "up_blocks.1.modules_list.4.conv_shortcut.weight",
        "conv_out.weight",
    ):
        assert name in names, name
    # no diffusers-style block children: everything inside a block is in its modules_list
    assert not [
        n for n in names if re.search(r"blocks?\.\d+\.(resnets|attentions)\.|mid_block\.(resnets|attentions)\.", n)
    ]
    transformer = unet.down_blocks[1].modules_list[1]
    assert transformer.transformer_blocks[0].attn2.heads == 8 and transformer.config.cross_attention_dim == 768


def test_mid_block_runs_its_first_resnet_twice_as_published():
    torch.manual_seed(0)
    unet = build_unet(get_preset("tiny")).eval()
    calls = {"first": 0, "last": 0}
    unet.mid_block.modules_list[0].register_forward_hook(lambda *_: calls.__setitem__("first", calls["first"] + 1))
    unet.mid_block.modules_list[-1].register_forward_hook(lambda *_: calls.__setitem__("last", calls["last"] + 1))
    with torch.no_grad():
        out = unet(torch.randn(1, 4, 64, 64), 999, encoder_hidden_states=torch.randn(1, 77, 32)).sample
    assert out.shape == (1, 4, 64, 64) and calls == {"first": 2, "last": 1}


def test_diffusers_loads_the_folder_as_a_stable_diffusion_pipeline(deci_checkpoints, deci_pipe):
    folder = deci_checkpoints / FOLDER
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["stages.families.decidiffusion.unet", "FlexibleUNet2DConditionModel"]
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is StableDiffusionPipeline and type(pipe.unet) is FlexibleUNet2DConditionModel
    assert type(pipe.scheduler) is DDIMScheduler
    config = pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction",
        True,
        "trailing",
    )
    pipe.scheduler.set_timesteps(30)
    timesteps = pipe.scheduler.timesteps.tolist()
    assert timesteps[:3] == [999, 966, 932] and timesteps[-2:] == [66, 32] and len(timesteps) == 30
    assert pipe.unet.config.configurations == get_preset("tiny").config("unet")


def test_defaults_are_the_cards_and_diffusers():
    params = GenerationParams(prompt="a cat")
    assert (params.denoiser_steps, params.size) == (30, 512)  # the card: 30 iterations, 512 x 512
    call = inspect.signature(StableDiffusionPipeline.__call__).parameters
    assert params.denoiser_guidance == call["guidance_scale"].default == 7.5
    family = get_family("decidiffusion")
    assert family.sizes == (512,) and [k.name for k in family.kinds] == ["text-to-image"]


REQUESTS = [
    dict(prompt="a red bicycle", seed=3, denoiser_steps=6),
    dict(prompt="a lighthouse at dusk", negative_prompt="fog", seed=11, denoiser_steps=4, denoiser_guidance=3.0),
    dict(prompt="a bowl of ramen", seed=5, denoiser_steps=3, denoiser_guidance=1.0),  # no guidance
    dict(prompt="an astronaut on a horse", seed=7, denoiser_steps=5, denoiser_guidance=12.0),
]


def test_each_image_alone_equals_diffusers(deci, deci_pipe):
    for fields in REQUESTS[:2]:
        params = deci.params(**fields)
        assert np.array_equal(pixels(deci.generate(params).image), pixels(latent_reference(deci_pipe, fields)))


def test_images_sharing_batched_steps_equal_diffusers(deci, deci_pipe):
    """Four requests with different seeds, steps and guidance (one without) step together; each image
    is still the reference's for that request alone."""
    unet = deci.stages["denoiser"]
    calls = unet.unet_calls
    requests = [deci.params(**fields) for fields in REQUESTS]
    results = deci.generate_many(requests, max_batch_size=4)
    steps = sum(r.denoiser_steps for r in requests)
    # guided tasks share one call per step; the unguided one runs on its own (engine.py says why)
    assert unet.unet_calls - calls < steps
    for fields, result in zip(REQUESTS, results, strict=True):
        assert result.error is None
        assert result.image.size == (512, 512)
        assert np.array_equal(pixels(result.image), pixels(latent_reference(deci_pipe, fields))), fields


def test_bad_requests_name_the_field(deci):
    with pytest.raises(InvalidParameter) as err:
        deci.params(prompt="a", stage1_steps=3)
    assert err.value.param == "stage1_steps"
    with pytest.raises(InvalidParameter) as err:
        deci.params(prompt="a", size=1024)
    assert err.value.param == "size"
    with pytest.raises(InvalidParameter) as err:
        deci.params(kind="image-to-image", prompt="a")
    assert err.value.param == "kind"
    with pytest.raises(InvalidParameter) as err:
        Cascade.from_checkpoints("unused", family="decidiffusion", safety_checker=True)
    assert err.value.param == "safety_checker"


def test_ifserve_checkpoints_and_generate_with_the_family(tmp_path, deci_pipe):
    ifserve = shutil.which("ifserve")
    assert ifserve, "the package is not installed (pip install -e .)"
    root = tmp_path / "ck"
    command = [ifserve, "checkpoints", "--family", "decidiffusion", "--preset", "tiny", "--out", str(root)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (root / FOLDER / "model_index.json").is_file()
    # the same seed writes the same weights as the session's checkpoints, which the reference loaded
    out = tmp_path / "cat.png"
    fields = dict(prompt="a cat in a hat", seed=21, denoiser_steps=4, denoiser_guidance=5.0)
    flags = ["--prompt", fields["prompt"], "--seed", "21", "--denoiser-steps", "4", "--denoiser-guidance", "5"]
    command = [ifserve, "generate", "--family", "decidiffusion", "--checkpoints", str(root), *flags]
    done = subprocess.run([*command, "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "denoiser:" in done.stdout
    with torch_threads(1):
        expected = pixels(latent_reference(deci_pipe, fields))
    assert np.array_equal(pixels(PIL.Image.open(out)), expected)

    done = subprocess.run([*command, "--stage1-steps", "3", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and "--stage1-steps" in done.stderr  # IF's flags are not this family's
    done = subprocess.run([*command, "--safety-checker", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 2 and "safety_checker" in done.stderr and "decidiffusion" in done.stderr
