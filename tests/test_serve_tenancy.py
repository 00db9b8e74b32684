"""Tenants over real HTTP on a real local Ray with two ingress replicas, against the tenants' database
on SQLite and on a real PostgreSQL server: keys (401 without one, a revoked key refused within seconds
and without a restart), limits counted once for both ingress replicas (429 with Retry-After and
OpenAI's x-ratelimit-* headers), a tenant's images hidden from another, and the prompt cache kept per tenant."""

from __future__ import annotations

import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from ray import serve

from serve import local_cluster
from serve.app import APP_NAME
from serve.tenancy.store import TenantStore
from tests.postgres import empty_database
from tests.serving import serving_config, wait_for

pytestmark = pytest.mark.serve

SMALL = {"size": "64x64", "stage1_steps": 2}  # stage I only: a cheap image


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def service(request, tiny_checkpoints, tmp_path_factory):
    """The service with tenants made before it starts (and a store to change them while it runs)."""
    tmp = tmp_path_factory.mktemp(f"serve-tenancy-{request.param}")
    database = empty_database(request, tmp)
    store = TenantStore(database)
    keys = {}
    for name, settings in {
        "alice": dict(priority="interactive", rpm=4),
        "bob": dict(priority="batch", weight=2.0, ipm=3),
        "carol": dict(max_concurrent=1),
        "dave": dict(),
    }.items():
        store.create_tenant(name, **settings)
        keys[name] = store.create_key(name)[1]
    config = serving_config(
        tiny_checkpoints,
        tmp,
        ingress={"num_replicas": 2},
        tenancy={"database": database, "refresh_s": 0.5},
        storage={"url_ttl_s": 8, "sweep_s": 1},  # links expire within the test, and the sweep follows
    )
    url = local_cluster.start(config, progress=lambda *_: None)
    yield url, store, keys
    local_cluster.stop()
    store.close()


def post(url: str, key: str | None, timeout: float = 300, **fields) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"prompt": "a red bicycle", **SMALL, **fields}
    return httpx.post(f"{url}/v1/images/generations", json=body, headers=headers, timeout=timeout)


def test_requests_without_a_valid_key_get_401(service):
    url, _, _ = service
    for key in (None, "ifs-not-a-key"):
        response = post(url, key)
        assert response.status_code == 401, response.text
        assert response.json()["error"]["code"] == "invalid_api_key"


def test_a_revoked_key_is_refused_within_seconds_without_a_restart(service):
    url, store, _ = service
    info, key = store.create_key("dave")  # a key made while the service runs works within seconds too
    wait_for(lambda: post(url, key).status_code == 200, timeout_s=30, what="the new key accepted")
    store.revoke_key(info.id)
    revoked = time.monotonic()
    # Refused by every ingress replica: a run of requests, spread over both by the proxy, all refused. (One
    # replica may refuse at once while the other has not re-read the keys yet, so one 401 is not enough.)
    wait_for(
        lambda: all(post(url, key).status_code == 401 for _ in range(6)),
        timeout_s=10,
        interval_s=0.1,
        what="the revoked key refused by every ingress replica",
    )
    assert time.monotonic() - revoked < 10


def test_request_limits_hold_across_two_ingress_replicas(service):
    """alice may send 4 requests a minute: of 10 sent at once, spread over both ingress replicas by the
    proxy, exactly 4 pass; the rest get 429 with Retry-After and OpenAI's headers."""
    url, _, keys = service
    status = serve.status().applications[APP_NAME].deployments["Ingress"].replica_states
    assert sum(n for state, n in status.items() if str(getattr(state, "value", state)) == "RUNNING") == 2
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda i: post(url, keys["alice"], seed=i), range(10)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 4 + [429] * 6, codes
    for response in responses:
        assert response.headers["x-ratelimit-limit-requests"] == "4"
        assert int(response.headers["x-ratelimit-remaining-requests"]) in range(4)
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert 1 <= int(refused.headers["Retry-After"]) <= 60


def test_image_limits_count_images_not_requests(service):
    url, _, keys = service
    first = post(url, keys["bob"], n=2)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-images"] == "3"
    assert first.headers["x-ratelimit-remaining-images"] == "1"
    second = post(url, keys["bob"], n=2)  # 2 more than the 1 left
    assert second.status_code == 429 and second.json()["error"]["type"] == "images"
    assert "Retry-After" in second.headers
    too_many = post(url, keys["bob"], n=4)  # more than a minute's allowance: never possible
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


def test_concurrency_limit_refuses_a_second_request_in_flight(service):
    """carol may have one request in flight. A stream holds its slot from the moment it is answered 200
    (the limits are checked before) to its last event: meanwhile another request of hers gets 429."""
    url, _, keys = service
    body = {"prompt": "a slow one", "size": "1024x1024", "stream": True, "stage1_steps": 4, "stage2_steps": 4,
            "stage3_steps": 4}  # fmt: skip
    headers = {"Authorization": f"Bearer {keys['carol']}"}
    with httpx.stream("POST", f"{url}/v1/images/generations", json=body, headers=headers, timeout=300) as stream:
        assert stream.status_code == 200
        second = post(url, keys["carol"])
        assert second.status_code == 429 and second.json()["error"]["type"] == "concurrency"
        assert "Retry-After" in second.headers
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and '"type": "image_generation.completed"' in events[-2]
    # The slot came back when the stream ended.
    wait_for(lambda: post(url, keys["carol"]).status_code == 200, timeout_s=10, what="carol's slot back")


def test_a_tenants_images_are_hidden_from_another_tenant(service):
    url, _, keys = service
    made = post(url, keys["dave"], response_format="url")
    assert made.status_code == 200, made.text
    link = made.json()["data"][0]["url"]
    unsigned = link.split("?")[0]
    own = httpx.get(unsigned, headers={"Authorization": f"Bearer {keys['dave']}"})
    assert own.status_code == 200 and own.content.startswith(b"\x89PNG")
    other = httpx.get(unsigned, headers={"Authorization": f"Bearer {keys['alice']}"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert httpx.get(unsigned).status_code == 401  # neither signed nor a key
    # The signed link itself is the capability, as OpenAI's are: it opens without a key, through either
    # ingress replica (the proxy spreads these over both; they share the store and the signing secret).
    assert all(httpx.get(link).content == own.content for _ in range(8))


@pytest.mark.parametrize("service", ["sqlite"], indirect=True)  # the store is the same whatever the database
def test_signed_links_refuse_tampering_and_expire_then_the_sweep_deletes_the_image(service):
    url, _, keys = service
    made = post(url, keys["dave"], response_format="url")
    assert made.status_code == 200, made.text
    link = made.json()["data"][0]["url"]
    opened = httpx.get(link)
    assert opened.status_code == 200
    assert int(opened.headers["cache-control"].rpartition("max-age=")[2]) <= 8  # no longer than the link
    path, query = link.split("?")
    expires = int(re.search(r"expires=(\d+)", query)[1])
    signature = re.search(r"signature=([0-9a-f]+)", query)[1]
    forged = [
        f"{path}?expires={expires}&signature={signature[:-1]}{'0' if signature[-1] != '0' else '1'}",
        f"{path}?expires={expires + 3600}&signature={signature}",  # a later expiry under the old signature
        f"{path[:-5]}x.png?expires={expires}&signature={signature}",  # another image
    ]
    for bad in forged:
        refused = httpx.get(bad)
        assert refused.status_code in (403, 404), (bad, refused.text)
        if refused.status_code == 403:
            assert refused.json()["error"]["code"] == "invalid_signature"
    assert httpx.get(forged[0]).status_code == 403 and httpx.get(forged[1]).status_code == 403
    # storage.url_ttl_s is 8 s here: then the link is refused as expired ...
    wait_for(lambda: httpx.get(link).status_code == 403, timeout_s=30, what="the link to expire")
    assert "expired" in httpx.get(link).json()["error"]["message"]
    # ... and the sweep (every storage.sweep_s) deletes the image: even its owner's key finds nothing.
    unsigned = {"Authorization": f"Bearer {keys['dave']}"}
    wait_for(lambda: httpx.get(path, headers=unsigned).status_code == 404, timeout_s=30, what="the sweep")


def test_a_changed_limit_applies_without_a_restart(service):
    url, store, keys = service
    store.create_tenant("erin")
    _, key = store.create_key("erin")
    wait_for(lambda: post(url, key).status_code == 200, timeout_s=30, what="erin's key accepted")
    store.update_tenant("erin", rpm=1)
    wait_for(
        lambda: post(url, key).headers.get("x-ratelimit-limit-requests") == "1", timeout_s=10, what="the new limit"
    )
    assert post(url, key).status_code == 429


def test_the_prompt_cache_is_kept_per_tenant(service):
    """A tenant's repeated prompt hits the encoder's cache; the same prompt from another tenant does not,
    so no tenant can tell from the timing what another has asked for."""
    url, _, keys = service
    encoder = serve.get_deployment_handle("TextEncoder", app_name=APP_NAME)
    prompt = f"a cache probe {uuid.uuid4().hex}"
    before = encoder.stats.remote().result()
    for tenant in ("dave", "dave", "carol"):
        assert post(url, keys[tenant], prompt=prompt).status_code == 200
    after = encoder.stats.remote().result()
    assert after["cache_misses"] - before["cache_misses"] == 2  # dave's first, carol's
    assert after["cache_hits"] - before["cache_hits"] == 1  # dave's second
