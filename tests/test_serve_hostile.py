"""Hostile tenants against a live service (real Ray, real HTTP, a PostgreSQL server of the module's own,
which one test stops): issue 25. No tenant's input stops another's work, no upload, download or batch
output is held in memory, limits count cost on every path, a deleted tenant leaves nothing behind, and
image responses keep moving while the database is locked, flooded or down. Then the hostile-input suite:
at least 1,000 requests generated from the service's own OpenAPI schema (schemathesis, with lone
surrogates and NULs mixed into the JSON bodies) and 1,000 generated batch lines: no 5xx, no hung batch,
and another tenant's batch completes meanwhile."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import psycopg
import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from ray import serve
from sqlalchemy import text

from serve import local_cluster
from serve.app import APP_NAME
from serve.batch.store import BatchStore, file_key, new_id
from serve.batch.tables import FileRow
from serve.blob_store import BlobStore
from serve.config import hash_key
from serve.database import Database
from serve.proxy_files import SPOOL, TOKEN_FILE
from serve.tenancy.store import TenantStore
from tests.postgres import running_postgres
from tests.serving import serving_config, wait_for

pytestmark = pytest.mark.serve

CONFIG_KEY = "ifs-the-configs-own-key"  # auth.api_key_sha256: the default tenant's, needs no database
ENDPOINT = "/v1/images/generations"
CHEAP = {"size": "64x64", "stage1_steps": 1}  # stage I only, one step
DONE = ("completed", "failed", "cancelled", "expired")
TENANTS = {
    "alice": {},  # the well-behaved tenant whose work must go on
    "mallory": {"ipm": 1},  # hostile requests: at most a standard image a minute actually runs
    "eve": {},  # hostile batch lines, of which the valid ones run
    "bob": {"rpm": 2, "ipm": 2},
    "dave": {"ipm": 20},
    "uploader": {"rpm": 1},
    "slowpoke": {},
    "single": {"max_concurrent": 1},
    "zed": {},
}


class Service:
    def __init__(self, url, config, keys, database, postgres):
        self.url, self.config, self.keys, self.database, self.postgres = url, config, keys, database, postgres
        self.tenants = TenantStore(database)
        self.store = BatchStore(database, BlobStore(config.storage.url))

    def headers(self, tenant: str) -> dict[str, str]:
        key = CONFIG_KEY if tenant == "default" else self.keys[tenant]
        return {"Authorization": f"Bearer {key}"}

    def image(self, tenant: str, timeout: float = 120, headers: dict | None = None, **fields) -> httpx.Response:
        body = {"prompt": "a lighthouse", **CHEAP, **fields}
        return httpx.post(f"{self.url}{ENDPOINT}", json=body, headers={**self.headers(tenant), **(headers or {})},
                          timeout=timeout)  # fmt: skip

    def upload(self, tenant: str, data: bytes) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/files", headers=self.headers(tenant), timeout=120,
                          files={"file": ("in.jsonl", data)}, data={"purpose": "batch"})  # fmt: skip

    def batch(self, tenant: str, file_id: str) -> dict:
        created = httpx.post(
            f"{self.url}/v1/batches",
            headers=self.headers(tenant),
            timeout=60,
            json={"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"},
        )
        assert created.status_code == 200, created.text  # fmt: skip
        return created.json()

    def submit(self, tenant: str, lines: list) -> dict:
        uploaded = self.upload(tenant, jsonl(lines))
        assert uploaded.status_code == 200, uploaded.text
        return self.batch(tenant, uploaded.json()["id"])

    def get(self, tenant: str, path: str) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=self.headers(tenant), timeout=60)

    def ended(self, tenant: str, batch_id: str, timeout_s: float = 300) -> dict:
        return wait_for(lambda: (b := self.get(tenant, f"/v1/batches/{batch_id}").json())["status"] in DONE and b,
                        timeout_s, 0.5, f"batch {batch_id} to end")  # fmt: skip

    def lines(self, tenant: str, file_id: str | None) -> list[dict]:
        if file_id is None:
            return []
        return [json.loads(x) for x in self.get(tenant, f"/v1/files/{file_id}/content").text.splitlines()]

    def tenant_id(self, name: str) -> str:
        return self.tenants.tenant(name).id


def jsonl(lines: list) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": {"prompt": "a boat", **CHEAP, **body}}


@pytest.fixture(scope="module")
def service(tiny_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-hostile")
    with running_postgres() as postgres:
        keys = {}
        with TenantStore(postgres.url) as store:
            for name, limits in TENANTS.items():
                store.create_tenant(name, **limits)
                keys[name] = store.create_key(name)[1]
        config = serving_config(
            tiny_checkpoints,
            tmp,
            auth={"api_key_sha256": [hash_key(CONFIG_KEY)]},
            tenancy={"database": postgres.url, "refresh_s": 0.5},
            ingress={"body_timeout_s": 4},
            storage={"url_ttl_s": 6, "sweep_s": 1},
            batch={"lease_s": 3, "poll_s": 0.2, "max_in_flight": 4, "max_lines": 100, "retry_for_s": 8},
        )
        url = local_cluster.start(config, progress=lambda *_: None)
        database = Database(postgres.url)
        try:
            yield Service(url, config, keys, database, postgres)
        finally:
            database.close()
            local_cluster.stop()


def stats(deployment: str) -> dict:
    return serve.get_deployment_handle(deployment, app_name=APP_NAME).stats.remote().result(timeout_s=60)


# ---- the two defects verified by running them ---------------------------------------------------------
def test_a_line_of_unstorable_text_is_refused_and_stops_no_other_tenants_batch(service):
    """A custom_id that is a lone surrogate (valid JSON), or a NUL, used to pass validation and then fail
    every runner round, so every tenant's batches stopped. Now the upload is refused, naming the line and
    field; a file that got in before (written to the store directly here) fails its own batch at
    validating; and another tenant's batch, created after it, completes."""
    surrogate = b'{"custom_id": "\\ud800", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}}'
    nul = jsonl([line("ok"), line("nul", prompt="a\u0000b")])
    for data, field in ((surrogate + b"\n", "line 1: custom_id"), (nul, "line 2: body.prompt")):
        refused = service.upload("mallory", data)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "file" and field in error["message"]
    # A file that was stored before uploads were checked.
    mallory = service.tenant_id("mallory")
    row = FileRow(id=new_id("file-"), tenant_id=mallory, filename="old.jsonl", purpose="batch", bytes=0,
                  created_at=datetime.now(UTC))  # fmt: skip
    row.blob, data = file_key(row.id), surrogate + b"\n" + jsonl([line("fine")])
    row.bytes = len(data)
    service.store.blobs.write(row.blob, data)
    with service.database.sessions.begin() as session:
        session.add(row)
    hostile = service.batch("mallory", row.id)
    good = service.submit("alice", [line("a1", seed=1), line("a2", seed=2)])
    assert service.ended("alice", good["id"])["status"] == "completed"
    failed = service.ended("mallory", hostile["id"])
    assert failed["status"] == "failed"
    assert [(e["line"], e["param"]) for e in failed["errors"]["data"]] == [(1, "custom_id")]


def test_a_limit_of_zero_answers_429_not_500(service):
    """`ifserve tenants create t --rpm 0` is refused now (tests/test_tenancy_store.py); a row that holds 0
    anyway (written by hand) refuses that tenant's requests with 429 and Retry-After, not a 500."""
    with service.database.engine.begin() as conn:
        conn.execute(text("UPDATE tenants SET rpm = 0 WHERE name = 'zed'"))
    answer = wait_for(lambda: (r := service.image("zed")).status_code != 200 and r, 30, 0.5, "the new limit")
    assert answer.status_code == 429 and answer.headers["Retry-After"] == "60", answer.text
    assert answer.json()["error"]["type"] == "requests"


# ---- the findings, one or more tests each -------------------------------------------------------------
def peak_rss_growth(pid: int):
    """A context whose value, once it ends, is how far the process's peak RSS rose above its RSS at the
    start, in MiB (Linux: the peak is reset through /proc/PID/clear_refs)."""

    class Peak:
        def __enter__(self):
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.start = _kib(pid, "VmRSS")
            return self

        def __exit__(self, *_):
            self.mib = (_kib(pid, "VmHWM") - self.start) / 1024

    return Peak()


def proxy_pid() -> int:
    """Serve's HTTP proxy's process (one, on the head)."""
    (pid,) = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _title(p).startswith("ray::Proxy")]
    return pid


def _title(process: Path) -> str:
    try:
        return (process / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _kib(pid: int, field: str) -> int:
    for entry in Path(f"/proc/{pid}/status").read_text().splitlines():
        if entry.startswith(field + ":"):
            return int(entry.split()[1])
    raise KeyError(field)


def test_uploads_and_downloads_stream_through_the_ingress(service, capsys):
    """Finding 1 and 2: a 48 MiB upload and its download raise the ingress's peak memory by a fraction of
    that (the upload is spooled to disk as it arrives, the download read from the store in chunks); they
    were held whole, with a copy."""
    size = 48 << 20
    record = jsonl([line("x", prompt="p" * 2000)])
    data = record * (size // len(record))
    ingress, proxy = stats("Ingress")["pid"], proxy_pid()
    with peak_rss_growth(ingress) as upload, peak_rss_growth(proxy) as upload_proxy:
        uploaded = service.upload("alice", data)
    assert uploaded.status_code == 200 and uploaded.json()["bytes"] == len(data), uploaded.text
    with peak_rss_growth(ingress) as download, peak_rss_growth(proxy) as download_proxy:
        received = 0
        with httpx.stream("GET", f"{service.url}/v1/files/{uploaded.json()['id']}/content",
                          headers=service.headers("alice"), timeout=120) as response:  # fmt: skip
            assert response.headers["content-length"] == str(len(data))
            assert not [name for name in response.headers if name.startswith("x-ifserve")]
            for chunk in response.iter_bytes():
                received += len(chunk)
                time.sleep(0.001)  # a client slower than the disk: nothing may pile up for it
    assert received == len(data)
    with capsys.disabled():  # printed whatever pytest's capture
        print(
            f"\npeak RSS growth, 48 MiB upload: ingress +{upload.mib:.1f} MiB, proxy +{upload_proxy.mib:.1f} MiB; "
            f"download: ingress +{download.mib:.1f} MiB, proxy +{download_proxy.mib:.1f} MiB"
        )
    assert max(upload.mib, upload_proxy.mib, download.mib, download_proxy.mib) < 24
    assert [p.name for p in Path(SPOOL).iterdir()] == [TOKEN_FILE]  # the spooled body went with its answer


def raw_request(service: Service, path: str, tenant: str, content_type: str, length: int, body: bytes = b""):
    """A request whose body stops after `body` (a slow client): the socket, to read the answer from."""
    host, port = urlparse(service.url).hostname, urlparse(service.url).port
    sock = socket.create_connection((host, port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {service.keys[tenant]}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n")  # fmt: skip
    sock.sendall(head.encode() + body)
    return sock


def status_of(sock: socket.socket) -> int:
    answer = b""
    while b"\r\n" not in answer:
        chunk = sock.recv(4096)
        if not chunk:
            break
        answer += chunk
    sock.close()
    return int(answer.split(b" ", 2)[1])


def test_uploads_are_admitted_before_their_body_is_read_and_must_arrive_in_time(service):
    """Finding 2: a tenant past its limits is refused before its upload is read (it used to be read whole
    first), a tenant has at most two uploads in flight, and a body that stops arriving is a 408 after
    `ingress.body_timeout_s` (4 s here) instead of holding an ingress slot until the proxy gives up."""
    boundary = "multipart/form-data; boundary=b"
    assert service.upload("uploader", jsonl([line("u")])).status_code == 200  # its one request a minute
    edit = raw_request(service, "/v1/images/edits", "uploader", boundary, 10 << 20)  # no body follows
    assert status_of(edit) == 429  # answered without waiting for 10 MiB that never come
    stalled = [raw_request(service, "/v1/files", "slowpoke", boundary, 1 << 20, b"--b\r\n") for _ in range(2)]
    time.sleep(1)
    third = service.upload("slowpoke", jsonl([line("s")]))
    assert third.status_code == 429 and third.json()["error"]["type"] == "uploads", third.text
    started = time.monotonic()
    assert [status_of(sock) for sock in stalled] == [408, 408]
    assert time.monotonic() - started < 30
    assert service.upload("slowpoke", jsonl([line("s")])).status_code == 200  # the slots came back


def test_an_upload_refused_after_it_was_admitted_gives_its_slot_back(service):
    """The proxy admits an upload (taking the tenant's one slot) before the ingress's route sees it; when
    the route then refuses it (here a NUL in a query parameter), the slot must come back at once, not
    stay renewed by the replica that admitted it. And a client cannot forge the proxy's headers."""
    url = f"{service.url}/v1/files"
    for _ in range(3):
        refused = httpx.post(url + "?x=%00", headers=service.headers("single"), files={"file": ("a.jsonl", b"{}\n")},
                             data={"purpose": "batch"}, timeout=60)  # fmt: skip
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "x", refused.text
    accepted = service.upload("single", jsonl([line("s")]))
    assert accepted.status_code == 200, accepted.text  # not 429: the three slots came back
    forged = {**service.headers("single"), "x-ifserve-proxy": "0" * 64, "x-ifserve-sendfile-ok": "1",
              "x-ifserve-spool": "0" * 32, "x-ifserve-lease": "someone-elses"}  # fmt: skip
    content = httpx.get(f"{url}/{accepted.json()['id']}/content", headers=forged, timeout=60)
    assert content.content == jsonl([line("s")]) and not [h for h in content.headers if h.startswith("x-ifserve")]
    again = httpx.post(url, headers=forged, files={"file": ("b.jsonl", jsonl([line("t")]))}, data={"purpose": "batch"},
                       timeout=60)  # fmt: skip
    assert again.status_code == 200 and again.json()["bytes"] == len(jsonl([line("t")])), again.text


def test_only_the_proxy_is_believed_about_spooled_uploads_and_files_to_send(service):
    """The ingress believes x-ifserve-* request headers only with the token it wrote where only this user
    (and so Serve's proxy, on the same head) can read it; without the proxy's middleware in front, a
    client's forged headers are ignored (the service's ingress made the token)."""
    from starlette.requests import Request

    from serve.http_uploads import Uploads
    from serve.proxy_files import PROXY_HEADER

    uploads = Uploads.__new__(Uploads)
    uploads.folder, uploads._token = Path(SPOOL), (Path(SPOOL) / TOKEN_FILE).read_text().strip()

    def request(**headers) -> Request:
        return Request({"type": "http", "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})

    assert not uploads.from_proxy(request())
    assert not uploads.from_proxy(request(**{PROXY_HEADER: "0" * 64}))
    assert uploads.from_proxy(request(**{PROXY_HEADER: uploads._token}))
    assert oct(Path(SPOOL).stat().st_mode & 0o777) == "0o700"


def test_batch_lines_are_charged_against_the_tenants_limits_by_cost(service):
    """Finding 4: bob may send 2 requests and 2 images a minute. A batch line asking for 3 images ends as
    the 400 the endpoint would answer; the other two run, and spend bob's minute, so his next interactive
    request is refused. An image's cost counts: dave's ipm of 20 holds one 1024 px image of 1000 stage III
    steps (12.8 standard images) but not two."""
    batch = service.submit("bob", [line("three", n=3), line("one", seed=1), line("two", seed=2)])
    done = service.ended("bob", batch["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 2
    (error,) = service.lines("bob", done["error_file_id"])
    assert error["custom_id"] == "three" and error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["param"] == "n"
    refused = service.image("bob")
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests", refused.text

    costly = {"size": "1024x1024", "stage3_steps": 1000}
    two = service.image("dave", headers={"X-Request-Timeout": "3"}, **costly, n=2)
    assert two.status_code == 400 and two.json()["error"]["param"] == "n", two.text
    assert "standard images" in two.json()["error"]["message"]
    one = service.image("dave", headers={"X-Request-Timeout": "2"}, **costly)  # admitted; its deadline ends it
    assert one.status_code == 504, one.text
    assert int(one.headers["x-ratelimit-remaining-images"]) <= 20 - 12


def test_a_batchs_url_images_outlive_the_interactive_link_lifetime(service):
    """Finding 5: `url` images expire with `storage.url_ttl_s` (6 s here), but a batch's images are kept,
    and their links signed, as long as its output file may exist."""
    batch = service.submit("alice", [line("linked", seed=7, response_format="url")])
    done = service.ended("alice", batch["id"])
    (output,) = service.lines("alice", done["output_file_id"])
    link = output["response"]["body"]["data"][0]["url"]
    expires = int(parse_qs(urlparse(link).query)["expires"][0])
    assert expires >= time.time() + 24 * 3600
    interactive = service.image("alice", response_format="url").json()["data"][0]["url"]
    unsigned = interactive.split("?")[0]
    wait_for(lambda: httpx.get(unsigned, headers=service.headers("alice")).status_code == 404, 60, 0.5,
             "the interactive image to be swept")  # fmt: skip
    kept = httpx.get(link, timeout=30)
    assert kept.status_code == 200 and kept.content.startswith(b"\x89PNG")


def test_a_deleted_tenant_leaves_nothing_and_its_name_inherits_nothing(service):
    """Finding 6: a tenant is its id. Deleting it ends its batches and deletes its files; one made again
    under the same name sees none of them."""
    with TenantStore(service.database) as tenants:
        tenants.create_tenant("temp")
        service.keys["temp"] = tenants.create_key("temp")[1]
    wait_for(lambda: service.get("temp", "/v1/files").status_code == 200, 30, 0.5, "temp's key")
    old_id = service.tenant_id("temp")
    batch = service.submit("temp", [line(f"t{i}", size="256x256", stage2_steps=2, seed=i) for i in range(8)])
    wait_for(lambda: service.get("temp", f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] >= 1,
             120, 0.25, "the batch to start")  # fmt: skip
    service.tenants.delete_tenant("temp")
    with service.database.sessions() as session:
        gone = lambda: not session.execute(  # noqa: E731
            text("SELECT 1 FROM batches WHERE tenant = :t UNION SELECT 1 FROM batch_files WHERE tenant = :t"),
            {"t": old_id}).first()  # fmt: skip
        wait_for(lambda: (session.rollback(), gone())[1], 30, 0.5, "the deleted tenant's batches and files to go")
    assert not [key for key in service.store.blobs.keys("files") if batch["input_file_id"] in key]
    with TenantStore(service.database) as tenants:
        tenants.create_tenant("temp")
        service.keys["temp"] = tenants.create_key("temp")[1]
    wait_for(lambda: service.get("temp", "/v1/files").status_code == 200, 30, 0.5, "the new temp's key")
    assert service.get("temp", "/v1/files").json()["data"] == []
    assert service.get("temp", f"/v1/batches/{batch['id']}").status_code == 404


def test_a_batch_whose_input_cannot_be_read_is_retried_then_fails_alone(service):
    """Finding 9 and the runner's isolation: an input file that cannot be read for a moment is read again
    (it used to fail the batch for good as missing_file); one that stays unreadable fails its own batch
    after `batch.retry_for_s` (8 s here), while another tenant's batch, created after it, completes."""
    blips, broken = (service.upload("mallory", jsonl([line(name)])).json() for name in ("blip", "broken"))
    root = Path(service.config.storage.url)

    def unreadable(file: dict) -> bytes:  # the blob becomes a folder: reading it is an OSError, not a miss
        path = root / file_key(file["id"])
        data = path.read_bytes()
        path.unlink()
        path.mkdir()
        return data

    blip_data, _ = unreadable(blips), unreadable(broken)
    blip, dead = service.batch("mallory", blips["id"]), service.batch("mallory", broken["id"])
    good = service.submit("alice", [line("g1", seed=3)])
    assert service.ended("alice", good["id"])["status"] == "completed"
    time.sleep(1)
    assert service.get("mallory", f"/v1/batches/{blip['id']}").json()["status"] == "validating"
    path = root / file_key(blips["id"])
    path.rmdir()
    path.write_bytes(blip_data)  # the store is back
    assert service.ended("mallory", blip["id"], 120)["status"] == "completed"
    failed = service.ended("mallory", dead["id"], 120)
    assert failed["status"] == "failed" and failed["errors"]["data"][0]["code"] == "validate_failed"


# ---- the hostile-input suite --------------------------------------------------------------------------
HOSTILE_TEXT = st.one_of(
    st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3),  # lone surrogates
    st.sampled_from(["\x00", "a\x00b", "\ud800", "\udfff\ud800x", "\u202e\ufeff", "\x00" * 64, " ", ""]),
    st.text(max_size=30),
)
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | HOSTILE_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(HOSTILE_TEXT, inner, max_size=3),
    max_leaves=6,
)


def poisoned(value, draw):
    """A JSON value with some of its strings (keys too) replaced by hostile ones."""
    if isinstance(value, str):
        return draw(HOSTILE_TEXT) if draw(st.integers(0, 3)) == 0 else value
    if isinstance(value, list):
        return [poisoned(item, draw) for item in value]
    if isinstance(value, dict):
        return {(draw(HOSTILE_TEXT) if draw(st.integers(0, 9)) == 0 else key): poisoned(item, draw)
                for key, item in value.items()}  # fmt: skip
    return value


@st.composite
def batch_lines(draw, valid: bool) -> list[bytes]:
    """A batch input file's lines: cheap valid requests with odd prompts, or anything a client could send."""
    count = draw(st.integers(3, 6)) if valid else 50
    lines = []
    for i in range(count):
        prompt = draw(st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=40)) + "."
        body = {"prompt": prompt, "seed": draw(st.integers(0, 2**31)), **CHEAP, "n": draw(st.integers(1, 2))}
        good = {"custom_id": f"v{i}-{draw(st.text(max_size=8))}", "method": "POST", "url": ENDPOINT, "body": body}
        if valid:
            lines.append(json.dumps(good).encode())
            continue
        kind = draw(st.integers(0, 5))
        if kind == 0:
            lines.append(draw(st.binary(max_size=60)).replace(b"\n", b" "))
        elif kind == 1:
            lines.append(json.dumps(draw(ANY_JSON)).encode())
        else:
            if kind == 2:
                good["body"][draw(HOSTILE_TEXT)] = draw(ANY_JSON)
            elif kind == 3:
                good["body"]["n"] = draw(ANY_JSON)
            elif kind == 4:
                good["custom_id"] = draw(st.one_of(HOSTILE_TEXT, ANY_JSON))
            lines.append(json.dumps(poisoned(good, draw)).encode())
    return lines


def test_the_hostile_input_suite(service, capsys):
    """At least 1,000 requests generated from the service's OpenAPI schema (each operation, positive and
    negative data, surrogates and NULs in half the JSON bodies), from mallory, and 1,000 generated batch
    lines, from eve; meanwhile alice's batch must complete. No answer may be a 5xx and nothing may hang."""
    import schemathesis
    from schemathesis import GenerationMode

    headers = service.headers("mallory")
    schema = schemathesis.openapi.from_url(f"{service.url}/openapi.json", headers=headers, timeout=30)
    schema.config.update(base_url=service.url, headers=headers, request_timeout=300)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert not [op.label for op in operations if op.has_skipped_required_body]  # every body is generated
    sent: Counter = Counter()
    problems: list[str] = []
    session = requests.Session()

    def exercise(operation, examples: int, mode: GenerationMode, hostile: bool) -> None:
        @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
        @settings(max_examples=examples, phases=[Phase.generate], deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def one(case, data):
            extra = {}
            if hostile and case.media_type == "application/json" and case.body is not None:
                extra["data"] = json.dumps(poisoned(case.body, data.draw)).encode()
            try:
                response = case.call(session=session, headers=headers, timeout=300, **extra)
            except requests.RequestException as err:
                problems.append(f"{operation.label}: no answer ({err!r}); sent {extra or case.body!r:.300}")
                return
            finally:
                sent[operation.label] += 1
            if response.status_code >= 500:
                problems.append(f"{operation.label}: {response.status_code} {response.text[:300]}; sent "
                                f"{extra.get('data') or case.body!r:.300}")  # fmt: skip

        try:
            one()
        except Unsatisfiable:  # negative data for an operation that takes nothing to get wrong
            pass

    generated: Counter = Counter()
    lines_sent, batches, upload_errors = 0, [], []

    @given(lines=st.data())
    @settings(max_examples=8, phases=[Phase.generate], deadline=None, database=None,
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def hostile_batch(lines):
        nonlocal lines_sent
        valid = lines.draw(st.integers(0, 3)) == 0  # about a quarter of them run, with odd prompts and seeds
        generated["batches"] += 1
        generated["valid"] += valid
        drawn = lines.draw(batch_lines(valid))
        lines_sent += len(drawn)
        uploaded = service.upload("eve", b"\n".join(drawn) + b"\n")
        if uploaded.status_code >= 500:
            upload_errors.append(f"upload {uploaded.status_code}: {uploaded.text[:300]}")
        if uploaded.status_code != 200:
            return
        created = httpx.post(f"{service.url}/v1/batches", headers=service.headers("eve"), timeout=60,
                             json={"input_file_id": uploaded.json()["id"], "endpoint": ENDPOINT,
                                   "completion_window": "24h"})  # fmt: skip
        if created.status_code >= 500:
            upload_errors.append(f"create {created.status_code}: {created.text[:300]}")
        elif created.status_code == 200:
            batches.append(created.json()["id"])

    while lines_sent < 1000 or generated["valid"] < 3:
        hostile_batch()
    good = service.submit("alice", [line(f"after-{i}", seed=40 + i) for i in range(3)])
    per_operation = -(-1000 // len(operations))
    for operation in operations:
        for mode, hostile in ((GenerationMode.POSITIVE, True), (GenerationMode.NEGATIVE, False)):
            exercise(operation, per_operation // 2 + 1, mode, hostile)
        while sent[operation.label] < per_operation:  # hypothesis stops early where little can vary
            before = sent[operation.label]
            exercise(operation, per_operation - before, GenerationMode.POSITIVE, True)
            if sent[operation.label] == before:
                break
    requests_sent = sum(sent.values())
    assert service.ended("alice", good["id"], 600)["status"] == "completed"
    hung = []
    for batch_id in batches:
        try:
            service.ended("eve", batch_id, 300)
        except AssertionError:
            hung.append(batch_id)
    with capsys.disabled():  # the suite's count, printed whatever pytest's capture
        print(f"\nhostile-input suite: {requests_sent} generated requests over {len(operations)} operations "
              f"({dict(sent)}), {lines_sent} generated batch lines in {generated['batches']} files "
              f"({len(batches)} batches created); {len(problems) + len(upload_errors)} 5xx or unanswered, "
              f"{len(hung)} hung batches")  # fmt: skip
    assert problems == [] and upload_errors == [], (problems + upload_errors)[:10]
    assert requests_sent >= 1000 and lines_sent >= 1000
    assert hung == []


# ---- the database locked, flooded or away (last: one of them stops the database) -------------------------
def test_images_keep_moving_while_the_database_is_locked_and_readyz_is_flooded(service):
    """Finding 7: the ingress's threads were shared by PNG encoding, every database call and /readyz, so
    a stalled database stalled every image response. Here the files table is locked while 24 Files calls
    wait on it and 200 /readyz arrive: an image is answered meanwhile, the Files calls end (200, or 503
    with Retry-After once the lock wait times out), and /readyz stays cheap."""
    lock = psycopg.connect(service.postgres.url.replace("postgresql+psycopg", "postgresql"), autocommit=False)
    lock.execute("LOCK TABLE batch_files IN ACCESS EXCLUSIVE MODE")
    answers: dict[str, list] = {"files": [], "ready": []}
    try:
        with ThreadPoolExecutor(48) as pool:
            files = [pool.submit(service.get, "alice", "/v1/files") for _ in range(24)]
            ready = [pool.submit(httpx.get, f"{service.url}/readyz", timeout=60) for _ in range(200)]
            time.sleep(1)
            image = service.image("default", timeout=60, seed=5)
            assert image.status_code == 200, image.text
            answered_while_locked = not all(f.done() for f in files)
            lock.rollback()
            answers["files"] = [f.result() for f in files]
            answers["ready"] = [r.result() for r in ready]
    finally:
        lock.close()
    assert answered_while_locked, "the Files calls ended first: the lock did not hold them"
    for response in answers["files"]:
        assert response.status_code in (200, 503), response.text
        if response.status_code == 503:
            assert response.headers["Retry-After"] and response.json()["error"]["code"] == "database_unavailable"
    assert {r.status_code for r in answers["ready"]} == {200}


def test_images_are_served_while_the_database_is_down_even_by_a_new_ingress(service):
    """Finding 8: with the database down, what needs it answers 503 with Retry-After (it was a 500), and
    images go on with the keys a replica can check: the config's, and the keys it read before. A new
    ingress replica starts without the database (one could not start at all) and serves the config's key;
    a database key it never read is a 503, and works once the database is back."""
    assert service.image("alice").status_code == 200  # read while the database was up
    service.postgres.stop()
    try:
        files = service.get("alice", "/v1/files")
        assert files.status_code == 503 and files.headers["Retry-After"], files.text
        assert files.json()["error"]["code"] == "database_unavailable"
        assert service.image("default", seed=1).status_code == 200
        assert service.image("alice", seed=2).status_code == 200
        old = stats("Ingress")["pid"]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: _answers_from_a_new_ingress(old), 180, 1, "a new ingress replica")
        assert service.image("default", seed=3).status_code == 200
        unknown = service.image("alice", seed=4)
        assert unknown.status_code == 503 and unknown.headers["Retry-After"], unknown.text
    finally:
        service.postgres.start()
    wait_for(lambda: service.image("alice", seed=5).status_code == 200, 60, 1, "alice's key once the database is back")


def _answers_from_a_new_ingress(old_pid: int) -> bool:
    try:
        return stats("Ingress")["pid"] != old_pid
    except Exception:  # noqa: BLE001 - not up yet
        return False
