"""A family is an addition: a toy two-stage family, defined only here, reuses the tiny IF stage I and the
x4 upscaler under its own names and folders (text -> 64 px "base" -> 256 px "upscale"). It runs in
process and served from one config that names it by import path, with no change to any other file:
its request fields (`base_steps`, `upscale_noise_level`, ...) reach the engine, the HTTP API and its
OpenAPI schema, and its images equal what its engines make alone."""

from __future__ import annotations

import shutil

import httpx
import numpy as np
import pytest
import yaml
from pydantic import Field

from serve import local_cluster
from serve.config import parse_config
from stages.cascade import Cascade
from stages.families.deepfloyd_if import load_stage1, load_stage3, load_text_encoder
from stages.family import ModelFamily, StageSpec
from stages.images import to_pil
from stages.params import Guidance, NoiseLevel, StageParams, Steps, request_params
from tests.serving import ROOT, decode, free_port, pixels, torch_threads


class BaseParams(StageParams):
    steps: Steps = Field(20, description="base denoising steps")
    guidance: Guidance = Field(5.0, description="base guidance scale")


class UpscaleParams(StageParams):
    steps: Steps = Field(10, description="upscale denoising steps")
    guidance: Guidance = Field(3.0, description="upscale guidance scale")
    noise_level: NoiseLevel = Field(30, description="noise added to the 64 px image")


ToyParams = request_params("ToyParams", {"base": BaseParams, "upscale": UpscaleParams}, (64, 256), module=__name__)

TOY = ModelFamily(
    name="toy-two-stage",
    encoder_folder="base",
    load_encoder=load_text_encoder,
    stages=(
        StageSpec("base", "Base", "base", 64, uses_embeddings=True, load=load_stage1),
        StageSpec("upscale", "Upscale", "upscale", 256, uses_embeddings=False, load=load_stage3),
    ),
    params=ToyParams,
)


@pytest.fixture(scope="module")
def toy_checkpoints(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    shutil.copytree(tiny_checkpoints / "IF-I", root / "base")
    shutil.copytree(tiny_checkpoints / "x4-upscaler", root / "upscale")
    return root


@pytest.fixture(scope="module")
def toy(toy_checkpoints):
    return Cascade.from_checkpoints(toy_checkpoints, family=TOY)


def alone(toy: Cascade, params) -> dict[int, np.ndarray]:
    """Each engine run alone on one work order, chained by hand: what the cascade must reproduce."""
    [embeddings] = toy.text_encoder.encode([params.prompt], [params.negative_prompt])
    images, previous = {}, None
    for spec in TOY.stages_for(params.size):
        request = TOY.stage_request(spec, "alone", params, embeddings=embeddings, previous=previous)
        [previous] = toy.stages[spec.name].run([request])
        images[spec.output_size] = pixels(to_pil(previous.image))
    return images


def test_toy_family_runs_in_process(toy):
    requests = [
        ToyParams(prompt="a small boat", seed=3, base_steps=4, upscale_steps=3),
        ToyParams(prompt="a tall tree", seed=4, size=64, base_steps=5, base_guidance=1.0),
        ToyParams(prompt="a red kite", seed=5, base_steps=3, upscale_steps=2, upscale_noise_level=60),
    ]
    results = toy.generate_many(requests, max_batch_size=4)
    for params, result in zip(requests, results, strict=True):
        assert result.error is None
        assert sorted(result.images) == sorted(s.output_size for s in TOY.stages_for(params.size))
        assert result.image.size == (params.size, params.size)
        for size, expected in alone(toy, params).items():
            assert np.array_equal(pixels(result.images[size]), expected), (params.seed, size)
    with pytest.raises(Exception, match="stage1_steps"):
        ToyParams.parse(prompt="a", stage1_steps=3)  # IF's fields are not the toy's


@pytest.fixture(scope="module")
def url(toy_checkpoints, tmp_path_factory):
    data = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    data["model"] = {"id": "toy", "family": f"{__name__}:TOY", "checkpoints": str(toy_checkpoints)}
    data["cluster"]["resources"] = {"pool_text_encoder": 1, "pool_base": 1, "pool_upscale": 1}
    data["stages"] = {"base": {"pool": "pool_base"}, "upscale": {"pool": "pool_upscale"}}
    data["http"]["port"] = free_port()
    tmp = tmp_path_factory.mktemp("serve-toy")
    data["storage"] = {"url": str(tmp / "store")}
    data["tenancy"] = {"database": f"sqlite:///{tmp}/tenants.db"}
    config = parse_config(data)
    url = local_cluster.start(config, progress=lambda *_: None)
    yield url
    local_cluster.stop()


@pytest.mark.serve
def test_toy_family_served_from_one_config(url, toy):
    body = {"prompt": "a small boat", "seed": 3, "size": "256x256", "base_steps": 4, "upscale_steps": 3}
    response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=300)
    assert response.status_code == 200, response.text
    item = response.json()["data"][0]
    assert [s["stage"] for s in item["stages"]] == ["base", "upscale"]
    with torch_threads(1):
        expected = alone(toy, ToyParams(prompt="a small boat", seed=3, base_steps=4, upscale_steps=3))
    assert np.array_equal(decode(item["b64_json"]), expected[256])

    bad = httpx.post(f"{url}/v1/images/generations", json={**body, "stage1_steps": 3}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stage1_steps"
    assert httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["sizes"] == ["64x64", "256x256"]
    schema = httpx.get(f"{url}/openapi.json", timeout=30).json()["components"]["schemas"]["ImageGenerationRequest"]
    assert {"base_steps", "upscale_noise_level"} <= set(schema["properties"])
    assert httpx.get(f"{url}/readyz", timeout=30).json()["replicas"] == {"TextEncoder": 1, "Base": 1, "Upscale": 1}
