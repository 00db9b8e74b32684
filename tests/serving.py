"""Helpers for the tests that run the Ray Serve application: a config from deploy/local.yaml with
overrides, decoding served images, and polling a deployment's stats."""

from __future__ import annotations

import base64
import copy
import io
import socket
import time
from pathlib import Path

import numpy as np
import PIL.Image
import yaml

from serve.config import ServeConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def serving_config(checkpoints: Path, tmp: Path, **overrides) -> ServeConfig:
    data = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    data = _merge(data, {"model": {"checkpoints": str(checkpoints)}, "http": {"port": free_port()}})
    data = _merge(data, {"ingress": {"image_dir": str(tmp / "images")}})
    return parse_config(_merge(data, overrides))


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
