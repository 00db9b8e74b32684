"""Fault injection: a stage whose admit, batched step, per-task step or finish raises for one chosen
request while others share its batch. The chosen request gets a clear error (OpenAI-shaped over
HTTP), every other request finishes with its reference-equal image, no caller waits past the test's
bound, and the failure is counted. In process, and through the served graph with real Ray, HTTP and
Ray's metrics endpoint.

The faulty stage lives in a family defined here (IF with its stage III wrapped), served from one config
that names it by import path: nothing outside this file changes.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from serve import local_cluster
from serve.app import APP_NAME
from stages.cascade import Cascade
from stages.errors import StageFailure
from stages.families import DEEPFLOYD_IF
from stages.families.deepfloyd_if import GenerationParams
from stages.families.deepfloyd_if.upscaler import StageIII
from stages.loading import load_pipeline
from tests.reference import reference_cascade
from tests.serving import (
    decode,
    fast_metrics_export,
    free_port,
    reference_images,
    serving_config,
    torch_threads,
    wait_for,
)

# The request whose seed is a key fails in that phase of stage III.
POISON = {901: "admit", 902: "predict", 903: "advance", 904: "finish"}
PHASES = {"admit": "admitting", "predict": "denoising", "advance": "scheduler step", "finish": "finishing"}


def _poisoned(request, phase: str) -> bool:
    return POISON.get(request.seed) == phase


class FaultyUpscaler(StageIII):
    def admit(self, requests):
        if any(_poisoned(r, "admit") for r in requests):
            raise RuntimeError("injected fault")
        return super().admit(requests)

    def predict(self, tasks):
        if any(_poisoned(t.request, "predict") for t in tasks):
            raise RuntimeError("injected fault")
        return super().predict(tasks)

    def advance_batch(self, tasks, outputs):
        if any(_poisoned(t.request, "advance") for t in tasks):
            raise RuntimeError("injected fault")
        return super().advance_batch(tasks, outputs)

    def advance(self, task, output):
        if _poisoned(task.request, "advance"):
            raise RuntimeError("injected fault")
        super().advance(task, output)

    def finish(self, task):
        if _poisoned(task.request, "finish"):
            raise RuntimeError("injected fault")
        return super().finish(task)


def load_faulty_stage3(path, *, name: str = "stage3", batch_invariant: bool = True, **kw) -> FaultyUpscaler:
    pipe = load_pipeline(path, expect=("StableDiffusionUpscalePipeline",), param=name, **kw)
    return FaultyUpscaler(pipe, batch_invariant, name)


FAULTY_IF = dataclasses.replace(
    DEEPFLOYD_IF,
    name="faulty-if",
    stages=(*DEEPFLOYD_IF.stages[:2], dataclasses.replace(DEEPFLOYD_IF.stages[2], load=load_faulty_stage3)),
)
FAST = dict(stage1_steps=3, stage2_steps=2, stage3_steps=3)
BOUND_S = 300  # no caller waits longer than this


def test_in_process_only_the_poisoned_requests_fail(tiny_checkpoints, reference_pipes):
    cascade = Cascade.from_checkpoints(tiny_checkpoints, family=FAULTY_IF)
    healthy = [GenerationParams(prompt=f"healthy {i}", seed=i, **FAST) for i in (1, 2)]
    poisoned = [GenerationParams(prompt=f"poisoned {seed}", seed=seed, **FAST) for seed in POISON]
    requests = [healthy[0], *poisoned, healthy[1]]
    with ThreadPoolExecutor(1) as pool:  # the bound: every request answered within it
        results = pool.submit(cascade.generate_many, requests, max_batch_size=8).result(timeout=BOUND_S)
    for params, result in zip(requests, results, strict=True):
        if params.seed in POISON:
            assert isinstance(result.error, StageFailure), result.error
            assert (result.error.stage, result.error.phase) == ("stage3", PHASES[POISON[params.seed]])
            assert str(result.error).startswith(f"stage3: {PHASES[POISON[params.seed]]} failed: RuntimeError")
            assert 1024 not in result.tensors and 256 in result.tensors  # it got as far as stage III
        else:
            assert result.error is None
            reference, _ = reference_cascade(reference_pipes, params)
            assert (result.tensors[1024] - reference[1024]).abs().max().item() <= 1e-4


# ---- served ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tiny_checkpoints, tmp_path_factory):
    with fast_metrics_export():
        metrics_port = free_port()
        config = serving_config(
            tiny_checkpoints,
            tmp_path_factory.mktemp("serve-faults"),
            model={"family": f"{__name__}:FAULTY_IF"},
            stages={"stage3": {"max_batch_size": 8, "max_ongoing_requests": 16}},
        )
        url = local_cluster.start(config, progress=lambda *_: None, metrics_port=metrics_port)
        yield url, metrics_port
        local_cluster.stop()


def post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=BOUND_S)


def counters(metrics_port: int) -> dict[tuple[str, str], float]:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    totals: dict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "ray_ifserve_stage_tasks_ended_total":
                totals[(sample.name, f"{labels['stage']} {labels['outcome']}")] += sample.value
            elif sample.name == "ray_ifserve_requests_total":
                totals[(sample.name, f"{labels['endpoint']} {labels['status']}")] += sample.value
    return totals


def stats(deployment: str) -> dict:
    return serve.get_deployment_handle(deployment, app_name=APP_NAME).stats.remote().result()


def assert_clean_error(error: dict, phase: str) -> None:
    assert error["type"] == "server_error" and error["code"] == "stage_failed"
    assert error["message"] == f"stage3: {PHASES[phase]} failed: RuntimeError: injected fault"


def test_served_poisoned_requests_get_500s_and_the_others_their_images(served, reference_pipes):
    url, metrics_port = served
    before = counters(metrics_port)
    bodies = [dict(prompt=f"request {seed}", seed=seed, **FAST) for seed in (1, *POISON, 2)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(url, **b), bodies))
    for body, response in zip(bodies, responses, strict=True):
        if body["seed"] in POISON:
            assert response.status_code == 500, response.text
            assert_clean_error(response.json()["error"], POISON[body["seed"]])
        else:
            assert response.status_code == 200, response.text
            with torch_threads(1):
                expected = reference_images(reference_pipes, GenerationParams(**body))[1024]
            assert np.array_equal(decode(response.json()["data"][0]["b64_json"]), expected)
    shared = [r.json()["data"][0]["stages"][2]["max_batch"] for r in responses if r.status_code == 200]
    assert max(shared) > 1  # the healthy requests shared stage III's steps with others

    def delta():
        after = counters(metrics_port)
        return {
            "failed": after[("ray_ifserve_stage_tasks_ended_total", "stage3 failed")]
            - before.get(("ray_ifserve_stage_tasks_ended_total", "stage3 failed"), 0),
            "500": after[("ray_ifserve_requests_total", "/v1/images/generations 500")]
            - before.get(("ray_ifserve_requests_total", "/v1/images/generations 500"), 0),
        }

    wait_for(lambda: delta() == {"failed": 4, "500": 4}, 60, what=f"failures counted (now {delta()})")


def test_a_stream_ends_with_an_openai_error_event(served):
    url, _ = served
    body = dict(prompt="streamed", seed=904, stream=True, **FAST)
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, timeout=BOUND_S) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert [e.get("stage") for e in events[:-1]] == ["stage1", "stage2"]
    assert_clean_error(events[-1]["error"], "finish")
    text = "\n".join(lines)
    assert "Traceback" not in text and "actor" not in text.lower()
    assert not re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", text)  # no address


def test_one_failed_image_cancels_its_siblings(served):
    url, _ = served
    deployments = ("StageI", "StageII", "StageIII")
    before = {d: stats(d) for d in deployments}
    # Seeds 899, 900, 901: the third fails at stage III's admission; the first two are then cancelled.
    response = post(url, prompt="three of a kind", seed=899, n=3, **{**FAST, "stage3_steps": 6})
    assert response.status_code == 500
    assert_clean_error(response.json()["error"], "admit")

    def cancelled() -> int:
        return sum(stats(d)["cancelled"] - before[d]["cancelled"] for d in deployments)

    wait_for(lambda: cancelled() == 2 and stats("StageIII")["running"] == 0, 60, what="the siblings to be cancelled")
    after = stats("StageIII")
    assert after["failed"] - before["StageIII"]["failed"] == 1
    assert after["completed"] == before["StageIII"]["completed"]  # neither sibling ran to the end
