"""POST /v1/images/edits end to end, over real HTTP on a real local Ray cluster, with the official
`openai` client's `images.edit`: image-to-image, inpainting (OpenAI's transparent mask) and streaming,
each equal to the in-process cascade; bad uploads answered 4xx naming the field before any stage sees
them. The deployment runs IF's safety checker and watermark, so the responses carry its flags."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from ray import serve

from serve import local_cluster
from serve.app import APP_NAME
from stages.cascade import Cascade
from stages.families.deepfloyd_if import GenerationParams, Img2ImgParams, InpaintParams
from stages.pictures import read_edit
from tests.serving import REPLICA_THREADS, decode, pixels, serving_config, torch_threads
from tests.test_edits import _png_header, alpha_mask, grey_mask, picture, png

pytestmark = pytest.mark.serve

FAST = dict(stage1_steps=6, stage2_steps=3, stage3_steps=3)
UPLOAD_LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def server(safety_checkpoints, tmp_path_factory):
    config = serving_config(
        safety_checkpoints,
        tmp_path_factory.mktemp("serve-edits"),
        model={"safety_checker": True},
        ingress={"max_upload_bytes": UPLOAD_LIMIT},
    )
    url = local_cluster.start(config, progress=lambda *_: None)
    yield url
    local_cluster.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused-on-loopback", timeout=600, max_retries=0)


@pytest.fixture(scope="module")
def safe_cascade(safety_checkpoints):
    return Cascade.from_checkpoints(safety_checkpoints, safety_checker=True)


def in_process(cascade, params, image: bytes, mask: bytes | None = None):
    with torch_threads(REPLICA_THREADS):  # the replicas' thread count: tests/serving.py says why
        result = cascade.generate(params, read_edit(image, mask))
    return pixels(result.image)


def stage_submissions() -> int:
    handle = serve.get_deployment_handle("StageI", app_name=APP_NAME)
    return handle.stats.remote().result()["submitted"]


def test_image_to_image_with_the_openai_client(client, safe_cascade):
    image = png(picture())
    response = client.images.edit(
        image=("sketch.png", image, "image/png"),
        prompt="a watercolor of a harbour",
        size="1024x1024",
        extra_body={"seed": 3, "strength": 0.6, **FAST},
    )
    [item] = response.data
    params = Img2ImgParams(prompt="a watercolor of a harbour", seed=3, stage1_strength=0.6, **FAST)
    assert (decode(item.b64_json) == in_process(safe_cascade, params, image)).all()
    extra = item.model_extra
    assert extra["seed"] == 3 and extra["nsfw_detected"] is False and extra["watermark_detected"] is False
    assert [s["stage"] for s in extra["stages"]] == ["stage1", "stage2", "stage3"]


def test_inpainting_with_a_transparent_mask_two_images(client, safe_cascade):
    image, mask = png(picture(128, seed=2)), png(alpha_mask(128))
    response = client.images.edit(
        image=("photo.png", image, "image/png"),
        mask=("mask.png", mask, "image/png"),
        prompt="blue sunglasses",
        n=2,
        size="256x256",
        extra_body={"seed": 40, **FAST},
    )
    assert [item.model_extra["seed"] for item in response.data] == [40, 41]
    for item in response.data:
        params = InpaintParams(prompt="blue sunglasses", seed=item.model_extra["seed"], size=256, **FAST)
        assert (decode(item.b64_json) == in_process(safe_cascade, params, image, mask)).all()


def test_streaming_an_edit_sends_stage_previews_then_the_image(client, safe_cascade):
    image, mask = png(picture()), png(grey_mask())
    events = list(
        client.images.edit(
            image=("photo.png", image, "image/png"),
            mask=("mask.png", mask, "image/png"),
            prompt="a cat",
            size="1024x1024",
            stream=True,
            extra_body={"seed": 8, **FAST},
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
    assert [e.size for e in events] == ["64x64", "256x256", "1024x1024"]
    params = InpaintParams(prompt="a cat", seed=8, **FAST)
    assert (decode(events[-1].b64_json) == in_process(safe_cascade, params, image, mask)).all()


def _post(url: str, files: dict, data: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/edits", files=files, data=data or {"prompt": "a cat"}, timeout=60)


@pytest.mark.parametrize(
    "files,status,param",
    [
        ({"image": ("x.png", png(picture())[:300], "image/png")}, 400, "image"),  # truncated
        ({"image": ("big.png", _png_header(50000, 50000), "image/png")}, 400, "image"),
        (
            {"image": ("x.png", png(picture()), "image/png"), "mask": ("m.png", png(grey_mask(64)), "image/png")},
            400,
            "mask",
        ),
        ({"image": ("cat.png", b"#!/bin/sh\necho not a picture\n" * 10, "image/png")}, 400, "image"),
        ({"image": ("huge.png", b"\x89PNG" + bytes(UPLOAD_LIMIT), "image/png")}, 413, "body"),
        ({"image": ("wide.png", png(picture().crop((0, 0, 96, 40))), "image/png")}, 400, "image"),
        ({"mask": ("m.png", png(grey_mask()), "image/png")}, 400, "image"),
    ],
    ids=["truncated", "50000x50000", "mismatched-mask", "not-an-image", "oversized", "not-square", "no-image"],
)
def test_bad_uploads_are_4xx_before_any_stage(server, files, status, param):
    before = stage_submissions()
    response = _post(server, files)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"].startswith(f"{param}:")
    assert stage_submissions() == before


def test_bad_fields_are_named_and_json_is_refused(server):
    image = {"image": ("x.png", png(picture()), "image/png")}
    response = _post(server, image, {"prompt": "a", "stage1_strength": "1.5"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stage1_strength"
    response = _post(server, image, {"prompt": "a", "strength": "0.5", "stage1_strength": "0.5"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "strength"
    response = httpx.post(f"{server}/v1/images/edits", json={"prompt": "a"}, timeout=60)
    assert response.status_code == 415 and response.json()["error"]["param"] == "Content-Type"
    b64 = base64.b64encode(png(picture())).decode()
    response = httpx.post(f"{server}/v1/images/edits", json={"prompt": "a", "image": b64}, timeout=60)
    assert response.status_code == 415  # an edit is multipart; JSON edits are for batch lines


def test_openapi_lists_the_edit_fields(server):
    schemas = httpx.get(f"{server}/openapi.json", timeout=30).json()["components"]["schemas"]
    assert {"strength", "stage1_strength", "stage2_strength", "input_fidelity"} <= set(
        schemas["ImageEditRequest"]["properties"]
    )
    assert "stage2_strength" in schemas["ImageEditMaskRequest"]["properties"]
    assert "stage1_strength" not in schemas["ImageGenerationRequest"]["properties"]


def test_an_edit_shares_stage_steps_with_a_generation(client, safe_cascade):
    """An edit and a text-to-image request in flight together share Stage I's batched steps; each image
    is still its own (batch invariance)."""
    handle = serve.get_deployment_handle("StageI", app_name=APP_NAME)
    before = handle.stats.remote().result()
    image = png(picture(seed=5))
    slow = dict(stage1_steps=30, stage2_steps=2, stage3_steps=2)
    with ThreadPoolExecutor(2) as pool:
        generation = pool.submit(
            client.images.generate, prompt="a lighthouse", size="256x256", extra_body={"seed": 2, **slow}
        )
        edit = pool.submit(
            client.images.edit,
            image=("p.png", image, "image/png"),
            prompt="a harbour",
            size="256x256",
            extra_body={"seed": 6, "strength": 1.0, **slow},
        )
        generated, edited = generation.result().data[0], edit.result().data[0]
    after = handle.stats.remote().result()
    assert after["task_steps"] - before["task_steps"] > after["steps"] - before["steps"]  # shared steps
    with torch_threads(REPLICA_THREADS):
        expected = safe_cascade.generate(GenerationParams(prompt="a lighthouse", seed=2, size=256, **slow)).image
    assert (decode(generated.b64_json) == pixels(expected)).all()
    params = Img2ImgParams(prompt="a harbour", seed=6, size=256, stage1_strength=1.0, **slow)
    assert (decode(edited.b64_json) == in_process(safe_cascade, params, image)).all()
