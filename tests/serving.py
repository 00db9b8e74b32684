"""Helpers for the tests that run the Ray Serve application: a config from deploy/local.yaml with
overrides, the reference images as a replica computes them, decoding served images, and polling."""

from __future__ import annotations

import base64
import copy
import io
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import yaml

from serve.config import ServeConfig, parse_config
from stages.families.deepfloyd_if import GenerationParams
from stages.images import to_pil
from tests.reference import reference_cascade

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def fast_metrics_export():
    """Ray exports metrics every second instead of every 10 s (set before the cluster starts)."""
    previous = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "1000"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RAY_metrics_report_interval_ms", None)
        else:
            os.environ["RAY_metrics_report_interval_ms"] = previous


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


# The shipped deploy/local.yaml is the planner's plan for a 2-core CPU: batch 1 and two replicas a stage,
# since batching costs there. The tests exercise step-level batching and count replicas, so they pin
# one replica a stage with room to batch (as the config did before the plan), whatever the plan says.
TEST_GRAPH = {
    "ingress": {"max_images_in_flight": None},  # the tests' bursts must reach the stages
    "cluster": {
        "num_cpus": 8,
        "resources": {"pool_text_encoder": 1, "pool_stage1": 2, "pool_stage2": 1, "pool_stage3": 1},
    },
    "encoder": {"max_batch_size": 8, "max_ongoing_requests": 32},
    "stages": {
        "stage1": {
            "max_batch_size": 8,
            "max_ongoing_requests": 16,
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "initial_replicas": None,
                "target_ongoing_requests": 4,
            },
        },
        **{
            name: {
                "max_batch_size": 4,
                "max_ongoing_requests": 8,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1, "initial_replicas": None},
            }
            for name in ("stage2", "stage3")
        },
    },
}


def serving_config(checkpoints: Path, tmp: Path, **overrides) -> ServeConfig:
    data = _merge(yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text()), TEST_GRAPH)
    data = _merge(data, {"model": {"checkpoints": str(checkpoints)}, "http": {"port": free_port()}})
    data = _merge(data, {"storage": {"url": str(tmp / "store")}})
    data = _merge(data, {"tenancy": {"database": f"sqlite:///{tmp / 'tenants.db'}"}})
    return parse_config(_merge(data, overrides))


# deploy/local.yaml gives every replica one CPU, hence one torch thread. On CPU the thread count is part
# of the numerics (kernels split reductions by thread), so the oracle runs with the replicas' count.
REPLICA_THREADS = 1


@contextmanager
def torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_images(reference_pipes, params: GenerationParams) -> dict[int, np.ndarray]:
    """The seed's reference code's images by size, as 8-bit pixels, computed as a replica computes."""
    with torch_threads(REPLICA_THREADS):
        images, _ = reference_cascade(reference_pipes, params)
    return {size: pixels(to_pil(image)) for size, image in images.items()}


def decode(b64: str) -> np.ndarray:
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def pixels(picture: PIL.Image.Image) -> np.ndarray:
    return np.asarray(picture.convert("RGB"), dtype=np.int16)


def wait_for(predicate, timeout_s: float, interval_s: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
