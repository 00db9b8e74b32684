"""Both families served at once from one config (deploy/two-families.yaml): DeepFloyd IF and
DeciDiffusion, each with its own deployments on its own pools, behind one OpenAI-compatible API. The
`model` field picks the family; DeciDiffusion's images equal diffusers' `StableDiffusionPipeline` alone
and while sharing the denoiser's batched steps, IF's still equal the seed's reference; each family's
metrics carry its own label values."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.util.state import list_actors

from serve import local_cluster
from serve.app import APP_NAME
from serve.config import parse_config
from stages.families.deepfloyd_if import GenerationParams
from tests.reference import latent_reference
from tests.serving import (
    REPLICA_THREADS,
    ROOT,
    decode,
    fast_metrics_export,
    free_port,
    pixels,
    reference_images,
    torch_threads,
    wait_for,
)
from tests.test_edits import picture, png

pytestmark = pytest.mark.serve

IF_ID, DECI_ID = "deepfloyd-if-tiny", "decidiffusion-tiny"


@pytest.fixture(scope="module")
def served(tiny_checkpoints, deci_checkpoints, tmp_path_factory):
    data = yaml.safe_load((ROOT / "deploy" / "two-families.yaml").read_text())
    data["model"]["checkpoints"] = str(tiny_checkpoints)
    data["models"][0]["model"]["checkpoints"] = str(deci_checkpoints)
    data["http"]["port"] = free_port()
    tmp = tmp_path_factory.mktemp("serve-families")
    data["storage"] = {"url": str(tmp / "store")}
    data["tenancy"] = {"database": f"sqlite:///{tmp}/tenants.db"}
    config = parse_config(data)
    with fast_metrics_export():
        metrics_port = free_port()
        url = local_cluster.start(config, progress=lambda *_: None, metrics_port=metrics_port)
        yield url, metrics_port
        local_cluster.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="unused-on-loopback", timeout=600, max_retries=0)


def expected_latent(deci_pipe, fields: dict):
    with torch_threads(REPLICA_THREADS):  # the replicas' thread count: tests/serving.py says why
        return pixels(latent_reference(deci_pipe, fields))


def stats(deployment: str) -> dict:
    return serve.get_deployment_handle(deployment, app_name=APP_NAME).stats.remote().result()


def test_models_lists_both_families_and_every_deployment_is_ready(served, client):
    url, _ = served
    cards = {model.id: model for model in client.models.list().data}
    assert set(cards) == {IF_ID, DECI_ID}
    assert cards[DECI_ID].model_extra["family"] == "decidiffusion"
    assert cards[DECI_ID].model_extra["sizes"] == ["512x512"]
    assert cards[IF_ID].model_extra["sizes"] == ["64x64", "256x256", "1024x1024"]
    replicas = httpx.get(f"{url}/readyz", timeout=30).json()["replicas"]
    assert replicas == {
        name: 1 for name in ("TextEncoder", "StageI", "StageII", "StageIII", "CLIPTextEncoder", "UNetNAS")
    }
    # each deployment's replica holds its own pool's resource
    pools = {
        actor.class_name.rpartition(":")[2]: {k for k in actor.required_resources if k.startswith("pool_")}
        for actor in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
        if actor.class_name.startswith(f"ServeReplica:{APP_NAME}:")
    }
    assert pools["UNetNAS"] == {"pool_denoiser"} and pools["CLIPTextEncoder"] == {"pool_clip_text_encoder"}
    assert pools["StageI"] == {"pool_stage1"} and pools["TextEncoder"] == {"pool_text_encoder"}


def test_model_field_selects_decidiffusion_and_its_image_equals_diffusers(client, deci_pipe):
    fields = dict(prompt="a red bicycle", seed=4, denoiser_steps=5, denoiser_guidance=6.0)
    response = client.images.generate(
        model=DECI_ID,
        prompt=fields["prompt"],
        size="512x512",
        extra_body={k: v for k, v in fields.items() if k != "prompt"},
    )
    assert response.model_extra["model"] == DECI_ID
    [item] = response.data
    assert [s["stage"] for s in item.model_extra["stages"]] == ["denoiser"]
    assert (decode(item.b64_json) == expected_latent(deci_pipe, fields)).all()


def test_both_families_at_once_each_image_its_reference(client, deci_pipe, reference_pipes):
    """Three DeciDiffusion requests (different seeds, steps, guidance) and an IF request in flight
    together: the latent ones share the denoiser's batched steps; every image equals its reference."""
    before = stats("UNetNAS")
    latent = [
        dict(prompt="a lighthouse", seed=1, denoiser_steps=12, denoiser_guidance=7.5),
        dict(prompt="a harbour at dawn", negative_prompt="fog", seed=2, denoiser_steps=9, denoiser_guidance=4.0),
        dict(prompt="a kite", seed=3, denoiser_steps=10, denoiser_guidance=1.0),
    ]
    if_fields = dict(prompt="a teapot", seed=5, stage1_steps=6, stage2_steps=3, stage3_steps=3)

    def latent_call(fields: dict):
        extra = {k: v for k, v in fields.items() if k != "prompt"}
        return client.images.generate(model=DECI_ID, prompt=fields["prompt"], extra_body=extra).data[0]

    def if_call():
        extra = {k: v for k, v in if_fields.items() if k != "prompt"}
        return client.images.generate(model=IF_ID, prompt=if_fields["prompt"], size="256x256", extra_body=extra).data[0]

    with ThreadPoolExecutor(4) as pool:
        latent_items = [pool.submit(latent_call, fields) for fields in latent]
        if_item = pool.submit(if_call)
        latent_items = [future.result() for future in latent_items]
        if_item = if_item.result()
    after = stats("UNetNAS")
    assert after["task_steps"] - before["task_steps"] > after["steps"] - before["steps"]  # shared steps
    for fields, item in zip(latent, latent_items, strict=True):
        assert (decode(item.b64_json) == expected_latent(deci_pipe, fields)).all(), fields
    expected = reference_images(reference_pipes, GenerationParams(size=256, **if_fields))
    assert (decode(if_item.b64_json) == expected[256]).all()


def test_requests_are_checked_against_the_chosen_family(served):
    url, _ = served
    post = lambda body: httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)  # noqa: E731
    response = post({"model": DECI_ID, "prompt": "a", "stage1_steps": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stage1_steps"
    response = post({"model": DECI_ID, "prompt": "a", "size": "1024x1024"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "size"
    response = post({"model": IF_ID, "prompt": "a", "denoiser_steps": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "denoiser_steps"
    response = post({"model": "dall-e-3", "prompt": "a"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    response = post({"model": 3, "prompt": "a"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
    nested = httpx.post(f"{url}/v1/images/generations", content=b"[" * 100_000, timeout=60,
                        headers={"Content-Type": "application/json"})  # fmt: skip
    assert nested.status_code == 400 and nested.json()["error"]["param"] == "body"
    edit = httpx.post(
        f"{url}/v1/images/edits",
        files={"image": ("p.png", png(picture()), "image/png")},
        data={"model": DECI_ID, "prompt": "a cat"},
        timeout=60,
    )
    assert edit.status_code == 400 and "decidiffusion has no image-to-image" in edit.json()["error"]["message"]
    schemas = httpx.get(f"{url}/openapi.json", timeout=30).json()["components"]["schemas"]
    assert "stage1_steps" in schemas["ImageGenerationRequest"]["properties"]
    assert "denoiser_steps" in schemas["ImageGenerationRequest_decidiffusion_tiny"]["properties"]


def _series(metrics_port: int) -> dict[tuple[str, str, str], float]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    found: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ray_ifserve_stage_images_total" or sample.name == "ray_ifserve_encoder_prompts_total":
                key = (sample.name, sample.labels.get("model", ""), sample.labels.get("stage", ""))
                found[key] = found.get(key, 0.0) + sample.value
    return found


def test_each_family_has_its_own_metric_label_values(served, client):
    _, metrics_port = served
    client.images.generate(model=DECI_ID, prompt="a fox", extra_body={"seed": 9, "denoiser_steps": 2})

    def labelled():
        series = _series(metrics_port)
        return series if series.get(("ray_ifserve_stage_images_total", DECI_ID, "denoiser"), 0) >= 1 else None

    series = wait_for(labelled, 60, what="the denoiser's image count to be exported")
    assert ("ray_ifserve_encoder_prompts_total", DECI_ID, "text_encoder") in series
    assert not [key for key in series if key[1] == IF_ID and key[2] == "denoiser"]
    assert not [key for key in series if key[1] == DECI_ID and key[2].startswith("stage")]
