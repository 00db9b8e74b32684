"""`ifserve up` as a user runs it: a subprocess that writes the tiny checkpoints into an empty folder,
starts a local Ray with the pools, serves with API keys required, and on SIGTERM drains (new requests
get 503 while those in flight finish) and stops cleanly (SIGINT stops the same way)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import yaml

from serve.config import hash_key
from tests.serving import ROOT, decode, free_port, wait_for

pytestmark = pytest.mark.serve


def test_up_serves_with_api_keys_and_drains_on_sigterm(tmp_path):
    config = yaml.safe_load((ROOT / "deploy" / "local.yaml").read_text())
    config["auth"] = {"api_key_sha256": [hash_key("sk-test")]}
    config["storage"] = {"url": str(tmp_path / "store")}
    config["tenancy"] = {"database": f"sqlite:///{tmp_path / 'tenants.db'}"}
    config_file = tmp_path / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config))
    checkpoints = tmp_path / "empty-checkpoints"
    checkpoints.mkdir()
    port = free_port()

    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve.cli",
            "up",
            "--config",
            str(config_file),
            "--checkpoints",
            str(checkpoints),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 400
        while not any(line.startswith("serving ") for line in lines):
            assert process.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        assert any(f"at {url}" in line for line in lines)
        assert (checkpoints / "IF-I" / "model_index.json").is_file()  # it made the tiny checkpoints first

        route = f"{url}/v1/images/generations"
        anonymous = httpx.post(route, json={"prompt": "a"}, timeout=60)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
        # Auth comes before the body is read: a bad or oversized body without a key is a 401 too.
        oversized = b'{"prompt": "' + b"x" * (1 << 20) + b'"}'
        json_header = {"content-type": "application/json"}
        for body in (b"{not json", b'{"prompt": ""}', oversized):
            refused = httpx.post(route, content=body, headers=json_header, timeout=60)
            assert refused.status_code == 401, (body[:20], refused.text)
        keyed = {**json_header, "Authorization": "Bearer sk-test"}
        too_large = httpx.post(route, content=oversized, headers=keyed, timeout=60)
        assert too_large.status_code == 413 and too_large.json()["error"]["param"] == "body"
        malformed = httpx.post(route, content=b"{not json", headers=keyed, timeout=60)
        assert malformed.status_code == 400 and malformed.json()["error"]["param"] == "body"
        assert httpx.get(f"{url}/healthz", timeout=60).status_code == 200  # probes need no key

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0, timeout=300)
        image = client.images.generate(prompt="a kite", size="64x64", extra_body={"seed": 1, "stage1_steps": 3})
        assert decode(image.data[0].b64_json).shape == (64, 64, 3)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0).models.list()

        # SIGTERM with work in flight: new requests get 503 while those in flight finish, then it stops.
        # The work (10-20 s here) must fit the drain bound that local.yaml's expected residences give
        # (about 70 s); 600 steps took 66 s on this box, and the drain cut them off.
        with ThreadPoolExecutor(2) as pool:
            slow = dict(prompt="a slow kite", size="64x64", stage1_steps=150)
            in_flight = [pool.submit(httpx.post, route, json=dict(slow, seed=i), headers=keyed, timeout=300)
                         for i in range(2)]  # fmt: skip
            time.sleep(2)  # both admitted
            process.send_signal(signal.SIGTERM)
            wait_for(lambda: any("shutting down" in line for line in lines), 30, what="the drain to start")
            refused = httpx.post(route, json=dict(slow, seed=9), headers=keyed, timeout=60)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining", refused.text
            assert refused.headers["retry-after"]
            for done in in_flight:
                assert done.result().status_code == 200, done.result().text
        assert process.wait(timeout=120) == 0, "".join(lines)
        reader.join(timeout=10)
        assert lines[-1].strip() == "stopped"
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        print("".join(lines))  # `ifserve up`'s own output, shown by pytest when the test fails
        if process.poll() is None:
            process.kill()
            subprocess.run(["ray", "stop", "--force"], capture_output=True)
