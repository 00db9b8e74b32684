"""Autoscaling, load shedding and readiness on a real local Ray cluster, with short autoscaling delays
(tolerant waits, no exact replica counts at exact times). One Ray session for the module."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from ray import serve

from serve import local_cluster
from serve.app import APP_NAME
from serve.orchestrator import running_replicas
from tests.serving import serving_config, wait_for

pytestmark = pytest.mark.serve

FAST_SCALING = dict(upscale_delay_s=0, downscale_delay_s=2, metrics_interval_s=0.5, look_back_period_s=1)


@pytest.fixture(scope="module")
def url(tiny_checkpoints, tmp_path_factory):
    config = serving_config(
        tiny_checkpoints,
        tmp_path_factory.mktemp("serve-scaling"),
        ingress={"num_replicas": 2},  # the edge's bounds hold for both: they are counted in one place
        stages={
            # Grows to 2 replicas when more than one request per replica is in flight.
            "stage1": {
                "max_batch_size": 2,
                "max_ongoing_requests": 2,
                "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, **FAST_SCALING},
            },
            # One request at a time and one queued: a burst is shed with 503.
            "stage2": {"max_batch_size": 1, "max_ongoing_requests": 1, "max_queued_requests": 1},
            # Scaled to zero until the first 1024 px request.
            "stage3": {
                "autoscaling": {
                    "min_replicas": 0,
                    "initial_replicas": 0,
                    "max_replicas": 1,
                    **FAST_SCALING,
                    "downscale_delay_s": 600,
                }
            },
        },
    )
    url = local_cluster.start(config, progress=lambda *_: None, wait=False)
    yield url
    local_cluster.stop()


def replicas(name: str) -> int:
    return running_replicas(serve.status(), APP_NAME, [name])[name]


def post(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)


def test_readyz_names_the_stage_without_a_replica_until_it_scales_from_zero(url):
    wait_for(lambda: replicas("StageII") >= 1 and replicas("StageI") >= 1, 120, what="stages I and II")
    response = httpx.get(f"{url}/readyz", timeout=30)
    assert response.status_code == 503 and response.headers["retry-after"]
    message = response.json()["error"]["message"]
    assert "StageIII" in message and "StageII," not in message and "StageI," not in message

    done = post(url, prompt="wake stage three", seed=1, stage1_steps=2, stage2_steps=2, stage3_steps=2)
    assert done.status_code == 200, done.text
    assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200


def test_a_burst_scales_stage_one_out_and_idle_scales_it_back(url):
    assert wait_for(lambda: replicas("StageI") == 1, 60, what="one StageI replica")
    peak = []

    def burst() -> list[int]:
        with ThreadPoolExecutor(8) as pool:
            return list(
                pool.map(
                    lambda i: post(url, prompt=f"burst {i}", size="64x64", seed=i, stage1_steps=40).status_code,
                    range(8),
                )
            )

    with ThreadPoolExecutor(1) as runner:
        statuses = runner.submit(burst)
        peak.append(wait_for(lambda: replicas("StageI") >= 2, 120, what="StageI to scale out"))
        assert set(statuses.result()) == {200}
    wait_for(lambda: replicas("StageI") == 1, 120, what="StageI to scale back in")


def peak_memory() -> dict[int, int]:
    """Peak resident memory (bytes) of each ingress and stage II replica process, by pid (all local)."""
    pids = set()
    for name in ("Ingress", "StageII"):
        handle = serve.get_deployment_handle(name, app_name=APP_NAME)
        pids |= {handle.stats.remote().result()["pid"] for _ in range(6)}
    peaks = {}
    for pid in pids:
        status = Path(f"/proc/{pid}/status").read_text()
        peaks[pid] = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) << 10
    return peaks


def test_ten_times_overload_is_refused_at_the_edge_before_any_stage_work(url):
    """Stage II holds one image at a time (1 running + 1 queued, less one slot kept for batch lines): of
    requests sent at 10x that, three times over, the admitted ones finish and the rest get 503 +
    Retry-After at once, having cost no stage anything (the text encoder saw only the admitted ones); the
    images admitted never exceeded the stage's room, and the replicas' peak memory did not grow from one
    wave to the next; a stream sent while it is full gets a 503, not a 200 and an error event."""
    limits = serve.get_deployment_handle("TenantLimits", app_name=APP_NAME)
    encoder = serve.get_deployment_handle("TextEncoder", app_name=APP_NAME)

    def encoded() -> int:
        one = encoder.stats.remote().result()
        return one["cache_hits"] + one["cache_misses"]

    room = limits.in_flight.remote().result()["room"]["StageII"]
    assert room == 1
    before = encoded()
    responses, peaks, n = [], [], 10 * int(room)
    for wave in range(3):  # the same overload again and again: what it holds must not grow with it
        with ThreadPoolExecutor(10) as pool:
            responses += pool.map(
                lambda i: post(url, prompt=f"shed {i}", size="256x256", seed=i, stage1_steps=2, stage2_steps=8),
                range(wave * n, (wave + 1) * n),
            )
        peaks.append(peak_memory())
    growth = {pid: peaks[-1][pid] - peaks[0][pid] for pid in peaks[0] if pid in peaks[-1]}
    print(f"peak RSS after each wave of 10x overload (MiB): {[{p: m >> 20 for p, m in w.items()} for w in peaks]}")
    assert growth and all(grown < 64 << 20 for grown in growth.values()), growth  # bounded: waves 2-3 add ~0
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
    for shed in (r for r in responses if r.status_code == 503):
        assert shed.headers.get("retry-after"), (shed.headers, shed.text)
        assert shed.json()["error"]["code"] == "overloaded"
        assert "StageII" in shed.json()["error"]["message"]
    assert encoded() - before == codes.count(200)  # the refused ones reached no stage at all
    load = limits.in_flight.remote().result()
    assert load["peak"]["StageII"] <= room and load["load"]["StageII"] == 0

    with ThreadPoolExecutor(1) as pool:  # hold stage II's room with a long image, then stream
        holder = pool.submit(post, url, prompt="hold", size="256x256", seed=1, stage1_steps=2, stage2_steps=60)
        wait_for(lambda: limits.in_flight.remote().result()["load"]["StageII"] == 1, 30, what="the room taken")
        stream = httpx.post(
            f"{url}/v1/images/generations", json={"prompt": "s", "size": "256x256", "stream": True}, timeout=60
        )
        assert stream.status_code == 503 and stream.headers.get("retry-after"), stream.text
        assert stream.json()["error"]["code"] == "overloaded"
        assert holder.result().status_code == 200
