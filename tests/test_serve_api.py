"""The served application end to end, over real HTTP on a real local Ray cluster with the pools
declared as logical resources: images are pixel-identical to the in-process cascade and the seed's
reference code, alone and under concurrent traffic, the OpenAI client works unchanged,
streaming, errors, step-level batching and cancellation. One Ray session for the whole module."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from ray import serve

from serve import local_cluster
from serve.app import APP_NAME
from stages.families.deepfloyd_if import GenerationParams
from tests.serving import REPLICA_THREADS, decode, pixels, reference_images, serving_config, torch_threads, wait_for

pytestmark = pytest.mark.serve

FAST = dict(stage1_steps=6, stage2_steps=3, stage3_steps=3)


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    config = serving_config(tiny_checkpoints, tmp_path_factory.mktemp("serve-api"))
    url = local_cluster.start(config, progress=lambda *_: None)
    yield url, config
    local_cluster.stop()


@pytest.fixture(scope="module")
def url(server):
    return server[0]


@pytest.fixture(scope="module")
def client(server):
    url, config = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", timeout=600, max_retries=0)


def stats(deployment: str) -> dict:
    return serve.get_deployment_handle(deployment, app_name=APP_NAME).stats.remote().result()


def generate(client, size: int = 1024, **fields):
    prompt = fields.pop("prompt")
    return client.images.generate(prompt=prompt, size=f"{size}x{size}", extra_body=fields)


def reference_pixels(reference_pipes, params: GenerationParams) -> np.ndarray:
    return reference_images(reference_pipes, params)[params.size]


def level_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    return int(np.abs(a - b).max())


def test_served_image_equals_in_process_cascade_and_reference(client, cascade, reference_pipes):
    fields = dict(prompt="a red bicycle leaning on a wall", negative_prompt="blurry", seed=11, **FAST)
    response = generate(client, **fields)
    params = GenerationParams(**fields)
    served = decode(response.data[0].b64_json)
    assert served.shape == (1024, 1024, 3)
    with torch_threads(REPLICA_THREADS):
        in_process = pixels(cascade.generate(params).image)
    # The oracle runs with the replicas' torch thread count (tests/serving.py says why).
    for deployment in ("TextEncoder", "StageI", "StageII", "StageIII"):
        assert stats(deployment)["torch_threads"] == REPLICA_THREADS, deployment
    assert level_diff(served, in_process) == 0
    assert level_diff(served, reference_pixels(reference_pipes, params)) == 0
    extra = response.data[0].model_extra
    assert extra["seed"] == 11
    assert [s["stage"] for s in extra["stages"]] == ["stage1", "stage2", "stage3"]
    assert [s["steps"] for s in extra["stages"]] == [6, 3, 3]


def test_concurrent_requests_with_other_parameters_each_equal_the_reference(client, reference_pipes):
    cases = [
        dict(
            prompt="an astronaut riding a horse",
            seed=5,
            size=1024,
            stage1_steps=8,
            stage2_steps=3,
            stage3_steps=2,
            stage3_guidance=3.0,
            stage3_noise_level=50,
        ),
        dict(
            prompt="a bowl of ramen",
            negative_prompt="dark",
            seed=2,
            size=256,
            stage1_timesteps="fast27",
            stage1_guidance=3.0,
            stage2_steps=4,
            stage2_noise_level=100,
        ),
        dict(prompt="a lighthouse at dusk", seed=9, size=64, stage1_steps=12, stage1_guidance=1.0),
        dict(
            prompt="a red bicycle leaning on a wall",
            seed=11,
            size=256,
            stage1_steps=5,
            stage2_steps=2,
            stage2_guidance=1.0,
        ),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:
        responses = list(pool.map(lambda c: generate(client, **dict(c)), cases))
    shared = 0
    for case, response in zip(cases, responses, strict=True):
        params = GenerationParams(**case)
        served = decode(response.data[0].b64_json)
        assert level_diff(served, reference_pixels(reference_pipes, params)) == 0, case["prompt"]
        shared += max(s["max_batch"] for s in response.data[0].model_extra["stages"]) > 1
    assert shared >= 2  # they really ran together in some stage


def test_n_images_use_consecutive_seeds(client, reference_pipes):
    response = generate(client, size=64, prompt="a small cabin in the snow", seed=40, n=3, stage1_steps=5)
    assert [d.model_extra["seed"] for d in response.data] == [40, 41, 42]
    for i, item in enumerate(response.data):
        params = GenerationParams(prompt="a small cabin in the snow", size=64, seed=40 + i, stage1_steps=5)
        assert level_diff(decode(item.b64_json), reference_pixels(reference_pipes, params)) == 0


def test_url_response_format_serves_the_png(client, url):
    fields = dict(prompt="a yellow taxi", seed=3, stage1_steps=4, stage2_steps=2)
    as_url = client.images.generate(
        prompt=fields["prompt"],
        size="256x256",
        response_format="url",
        extra_body={k: v for k, v in fields.items() if k != "prompt"},
    )
    as_b64 = generate(client, size=256, **fields)
    fetched = httpx.get(as_url.data[0].url, timeout=30)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert np.array_equal(decode(base64.b64encode(fetched.content).decode()), decode(as_b64.data[0].b64_json))
    assert httpx.get(f"{url}/v1/images/files/{'0' * 32}/{'0' * 32}-0.png").status_code == 404


def test_streaming_sends_a_preview_per_stage_then_the_image(client, reference_pipes):
    fields = dict(prompt="a paper boat on a pond", seed=8, **FAST)
    stream = client.images.generate(
        prompt=fields["prompt"],
        size="1024x1024",
        stream=True,
        extra_body={k: v for k, v in fields.items() if k != "prompt"},
    )
    events = list(stream)
    kinds = [(e.type, e.model_extra.get("stage") or "") for e in events]
    assert kinds == [
        ("image_generation.partial_image", "stage1"),
        ("image_generation.partial_image", "stage2"),
        ("image_generation.completed", ""),
    ]
    assert [e.size for e in events] == ["64x64", "256x256", "1024x1024"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    images = reference_images(reference_pipes, GenerationParams(**fields))
    for event, size in zip(events, (64, 256, 1024), strict=True):
        assert level_diff(decode(event.b64_json), images[size]) == 0, size


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 2001}, "prompt"),
        ({"prompt": "a", "size": "512x512"}, "size"),
        ({"prompt": "a", "n": 0}, "n"),
        ({"prompt": "a", "n": 9}, "n"),
        ({"prompt": "a", "stage1_steps": 0}, "stage1_steps"),
        ({"prompt": "a", "stage3_steps": 1001}, "stage3_steps"),
        ({"prompt": "a", "stage2_guidance": -1}, "stage2_guidance"),
        ({"prompt": "a", "stage1_timesteps": "fast99"}, "stage1_timesteps"),
        ({"prompt": "a", "stage2_noise_level": 1000}, "stage2_noise_level"),
        ({"prompt": "a", "stage3_noise_level": 351}, "stage3_noise_level"),
        ({"prompt": "a", "response_format": "gif"}, "response_format"),
        ({"prompt": "a", "colour": "red"}, "colour"),
        ({"size": "64x64"}, "prompt"),
    ],
)
def test_bad_input_is_a_400_in_openai_shape_naming_the_field(url, body, param):
    response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]


def test_an_open_service_takes_no_cross_site_request_and_only_its_media_types(url):
    """Issue 25, finding 11: open (no keys, loopback), any web page its operator visits could POST to it.
    A browser sends a cross-site POST without asking first only as text/plain, a form or multipart, and
    says where it came from (Origin): such a request is refused before anything is read or run."""
    body = b'{"prompt": "a cat", "size": "64x64", "stage1_steps": 1}'
    generations = f"{url}/v1/images/generations"
    for media in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": media} if media else {}
        refused = httpx.post(generations, content=body, headers=headers, timeout=30)
        assert refused.status_code == 415 and refused.json()["error"]["param"] == "Content-Type", media
    json_headers = {"Content-Type": "application/json"}
    for origin in ("https://evil.example", "null"):
        refused = httpx.post(generations, content=body, headers={**json_headers, "Origin": origin}, timeout=30)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_site_request", origin
    upload = httpx.post(f"{url}/v1/files", files={"file": ("a.jsonl", b"{}")}, data={"purpose": "batch"},
                        headers={"Origin": "https://evil.example"}, timeout=30)  # fmt: skip
    assert upload.status_code == 403
    cancel = httpx.post(f"{url}/v1/batches/batch_x/cancel", headers={"Content-Type": "text/plain"}, timeout=30)
    assert cancel.status_code == 415
    host = url.removeprefix("http://")
    same_site = httpx.post(generations, content=body, headers={**json_headers, "Origin": f"http://{host}"}, timeout=120)
    assert same_site.status_code == 200, same_site.text


def test_openai_client_sees_errors_as_its_own_exceptions(client):
    with pytest.raises(openai.BadRequestError) as bad:
        generate(client, prompt="a", stage2_noise_level=-5)
    assert bad.value.param == "stage2_noise_level"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="dall-e-3", prompt="a", size="64x64")
    assert missing.value.code == "model_not_found"


def test_models_health_ready_and_openapi(client, url, server):
    model_id = server[1].model.id
    assert [m.id for m in client.models.list().data] == [model_id]
    assert client.models.retrieve(model_id).id == model_id
    assert httpx.get(f"{url}/v1/models/unknown").status_code == 404
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{url}/readyz").json()
    assert ready["status"] == "ready"
    assert set(ready["replicas"]) == {"TextEncoder", "StageI", "StageII", "StageIII"}
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/images/generations" in spec["paths"]
    assert "stage2_noise_level" in spec["components"]["schemas"]["ImageGenerationRequest"]["properties"]


def test_a_request_sent_mid_denoise_shares_unet_calls(client, reference_pipes):
    before = stats("StageI")
    long = {}
    thread = threading.Thread(
        target=lambda: long.update(r=generate(client, size=64, prompt="a long one", seed=1, stage1_steps=60))
    )
    thread.start()
    wait_for(lambda: stats("StageI")["task_steps"] >= before["task_steps"] + 5, 60, what="the long request to start")
    short = generate(client, size=64, prompt="a short one", seed=2, stage1_steps=5)
    thread.join(timeout=120)
    assert short.data[0].model_extra["stages"][0]["max_batch"] == 2
    assert long["r"].data[0].model_extra["stages"][0]["max_batch"] == 2
    params = GenerationParams(prompt="a short one", seed=2, size=64, stage1_steps=5)
    assert level_diff(decode(short.data[0].b64_json), reference_pixels(reference_pipes, params)) == 0
    after = stats("StageI")
    # Two requests, 65 task-steps, fewer UNet calls than that: five steps were shared.
    assert after["task_steps"] - before["task_steps"] == 65
    assert after["steps"] - before["steps"] == 60


@pytest.mark.parametrize("streaming", [False, True])
def test_a_disconnected_client_cancels_its_tasks(url, client, reference_pipes, streaming):
    before = stats("StageI")
    body = {"prompt": "never finished", "size": "64x64", "seed": 3, "stage1_steps": 500, "stream": streaming}
    other = {}
    survivor = threading.Thread(
        target=lambda: other.update(
            r=generate(client, size=256, prompt="a survivor", seed=4, stage1_steps=12, stage2_steps=3)
        )
    )
    with httpx.Client(timeout=httpx.Timeout(600, read=4 if not streaming else 600)) as http:
        if streaming:
            with http.stream("POST", f"{url}/v1/images/generations", json=body):
                survivor.start()
                wait_for(lambda: stats("StageI")["task_steps"] >= before["task_steps"] + 10, 60, what="denoising")
            # leaving the block closes the connection mid-stream
        else:
            survivor.start()
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
                http.post(f"{url}/v1/images/generations", json=body)
    after = wait_for(
        lambda: (s := stats("StageI"))["cancelled"] > before["cancelled"] and s["running"] == 0 and s,
        60,
        what="the task to leave the batch",
    )
    survivor.join(timeout=120)
    assert after["task_steps"] - before["task_steps"] < 500  # it did not run to the end
    params = GenerationParams(prompt="a survivor", seed=4, size=256, stage1_steps=12, stage2_steps=3)
    assert level_diff(decode(other["r"].data[0].b64_json), reference_pixels(reference_pipes, params)) == 0


def test_repeated_prompts_hit_the_embedding_cache(client):
    before = stats("TextEncoder")
    for seed in (1, 2):
        generate(client, size=64, prompt="a cached prompt", seed=seed, stage1_steps=2)
    after = stats("TextEncoder")
    assert after["cache_misses"] - before["cache_misses"] == 1
    assert after["cache_hits"] - before["cache_hits"] == 1


def test_replicas_use_as_many_torch_threads_as_cpus(server):
    config = server[1]
    for name, cpus in [("StageI", config.stages["stage1"].num_cpus), ("TextEncoder", config.encoder.num_cpus)]:
        assert stats(name)["torch_threads"] == max(1, int(cpus))


def test_bench_load_generator_reports_per_stage_latency(url, tmp_path):
    """`ifserve bench` against the live service: closed and open loop, per-stage records from the
    responses, JSON and the latency plot."""
    import json

    from serve.cli import main

    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    fields = "--fields=stage1_steps=4"
    assert (
        main(
            [
                "bench",
                "--url",
                url,
                "--concurrency",
                "2",
                "--requests",
                "3",
                "--size",
                "64",
                fields,
                "--objective",
                "600",
                "--json",
                str(out),
                "--plot",
                str(plot),
            ]
        )
        == 0
    )
    assert main(["bench", "--url", url, "--rate", "4", "--requests", "2", "--size", "64", fields]) == 0
    [point] = json.loads(out.read_text())["points"]
    assert (point["requests"], point["succeeded"], point["concurrency"]) == (3, 3, 2)
    assert point["met_objective"] == 1.0
    latency = point["latency_s"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert set(point["stages"]) == {"stage1"}  # a 64 px image is stage I's alone
    for outcome in point["outcomes"]:
        [record] = outcome["stages"]
        assert record["steps"] == 4 and record["run_seconds"] <= outcome["latency_s"]
    assert plot.read_bytes().startswith(b"\x89PNG")
