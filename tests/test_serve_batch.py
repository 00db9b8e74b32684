"""OpenAI's Batch API end to end on a real local Ray, with the official `openai` client, on SQLite and
on a real PostgreSQL: images equal to the reference; the runner killed, the application restarted and
Ray restarted mid-batch, each time every custom_id exactly once, no duplicate image, no leftover partial
file, and the database's counts equal to the files; cancel mid-batch; every bad input refused before
anything runs; another tenant's files and batches answer 404."""

from __future__ import annotations

import base64
import json
import os
import signal
from collections import Counter
from urllib.parse import urlparse

import httpx
import numpy as np
import openai
import pytest
import ray
from ray import serve
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from serve import local_cluster
from serve.app import APP_NAME, build_app
from serve.batch.tables import ItemRow
from serve.blob_store import BlobStore
from serve.database import open_database
from serve.tenancy.store import TenantStore
from stages.families.deepfloyd_if import GenerationParams
from tests.postgres import empty_database
from tests.serving import decode, reference_images, serving_config, wait_for

pytestmark = pytest.mark.serve

ENDPOINT = "/v1/images/generations"
# The crash, cancel, validation and end-to-end tests run on both databases; what does not touch the
# database's concurrency runs on SQLite only, to keep the suite short.
SQLITE_ONLY = pytest.mark.parametrize("service", ["sqlite"], indirect=True)
DONE = ("completed", "failed", "cancelled", "expired")


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def service(request, tiny_checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"serve-batch-{request.param}")
    database = empty_database(request, tmp)
    keys = {}
    with TenantStore(database) as tenants:
        for name in ("alice", "bob"):
            tenants.create_tenant(name)
            keys[name] = tenants.create_key(name)[1]
    config = serving_config(
        tiny_checkpoints,
        tmp,
        tenancy={"database": database, "refresh_s": 0.5},
        batch={"lease_s": 3, "poll_s": 0.2, "max_in_flight": 4, "max_lines": 40, "max_batch_bytes": 100_000},
    )
    url = local_cluster.start(config, progress=lambda *_: None)
    engine = open_database(database)
    yield Service(url, config, keys, engine, BlobStore(config.storage.url))
    engine.dispose()
    local_cluster.stop()


class Service:
    def __init__(self, url, config, keys, engine, blobs):
        self.url, self.config, self.keys, self.engine, self.blobs = url, config, keys, engine, blobs

    def client(self, tenant: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.keys[tenant], max_retries=8, timeout=60)


def body(i: int, size: int = 256, **extra) -> dict:
    return {"prompt": f"a lighthouse, number {i}", "size": f"{size}x{size}", "seed": 100 + i, "stage1_steps": 2,
            "stage2_steps": 2, **extra}  # fmt: skip


def jsonl(lines: list) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def submit(client: openai.OpenAI, bodies: dict[str, dict], **extra):
    lines = [{"custom_id": cid, "method": "POST", "url": ENDPOINT, "body": b} for cid, b in bodies.items()]
    source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return client.batches.create(input_file_id=source.id, endpoint=ENDPOINT, completion_window="24h", **extra)


def finished(client: openai.OpenAI, batch_id: str, timeout_s: float = 300):
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in DONE and b, timeout_s, 0.5,
                    f"batch {batch_id} to end")  # fmt: skip


def lines_of(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    return [] if file_id is None else [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


# The crash tests send the same lines on each database: their references are computed once.
REFERENCES: dict[str, np.ndarray] = {}


def reference(reference_pipes, fields: dict, seed: int) -> np.ndarray:
    size = int(fields["size"].partition("x")[0])
    params = GenerationParams(**{**{k: v for k, v in fields.items() if k not in ("response_format", "n")},
                                 "size": size, "seed": seed})  # fmt: skip
    key = params.model_dump_json()
    if key not in REFERENCES:
        REFERENCES[key] = reference_images(reference_pipes, params)[size]
    return REFERENCES[key]


def picture(item: dict) -> np.ndarray:
    if "b64_json" in item:
        return decode(item["b64_json"])
    fetched = httpx.get(item["url"], timeout=30)  # signed: no key needed
    assert fetched.status_code == 200, fetched.text
    return decode(base64.b64encode(fetched.content).decode())


def check_exactly_once(service: Service, client: openai.OpenAI, batch, bodies: dict[str, dict], reference_pipes):
    """Every custom_id once, counts equal to the files, each image the reference's, no partial file or
    duplicate image in the store."""
    assert batch.status == "completed", batch
    outputs, errors = lines_of(client, batch.output_file_id), lines_of(client, batch.error_file_id)
    seen = Counter(line["custom_id"] for line in outputs + errors)
    assert seen == Counter(bodies.keys()), f"not each custom_id once: {seen}"
    assert errors == []
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (len(bodies), len(outputs), len(errors))
    with Session(service.engine) as session:  # the database's own rows agree
        states = Counter(session.scalars(select(ItemRow.state).where(ItemRow.batch_id == batch.id)))
    assert states == Counter({"succeeded": len(outputs)})
    for line in outputs:
        fields = bodies[line["custom_id"]]
        (item,) = line["response"]["body"]["data"]
        assert line["response"]["status_code"] == 200 and item["seed"] == fields["seed"]
        assert np.array_equal(picture(item), reference(reference_pipes, fields, item["seed"])), line["custom_id"]
    keys = service.blobs.keys()
    assert [k for k in keys if k.endswith(".tmp")] == [], "a partial file was left behind"
    assert [k for k in keys if k.startswith(f"batches/{batch.id}/")] == [], "per-item results left behind"
    request_ids = {line["response"]["request_id"] for line in outputs}
    images = [k for k in keys if k.startswith("images/") and k.split("/")[-1].rsplit("-", 1)[0] in request_ids]
    linked = [urlparse(item["url"]).path.split("/", 4)[-1] for line in outputs
              for item in line["response"]["body"]["data"] if "url" in item]  # fmt: skip
    assert sorted(k.removeprefix("images/") for k in images) == sorted(linked), "an image without its line"


def test_a_batch_through_the_official_client_gives_the_reference_images(service, reference_pipes):
    client = service.client()
    bodies = {
        "small": body(1, size=64),
        "cascade": body(2, negative_prompt="blurry", stage1_guidance=5.0),
        "as-url": body(3, response_format="url"),
        "two": {**body(4, size=64), "n": 2},
        "unseeded": {k: v for k, v in body(5, size=64).items() if k != "seed"},
    }
    batch = submit(client, bodies, metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    done = finished(client, batch.id)
    assert done.status == "completed", done.errors
    assert done.request_counts.completed == 5 and done.error_file_id is None
    outputs = {line["custom_id"]: line for line in lines_of(client, done.output_file_id)}
    assert list(outputs) == list(bodies)  # in the input's order
    for custom_id, fields in bodies.items():
        data = outputs[custom_id]["response"]["body"]["data"]
        assert len(data) == fields.get("n", 1)
        for item in data:
            assert np.array_equal(picture(item), reference(reference_pipes, fields, item["seed"])), custom_id
    assert "url" in outputs["as-url"]["response"]["body"]["data"][0]
    assert client.batches.list(limit=1).data[0].id == batch.id


@SQLITE_ONLY
def test_an_edit_batch_gives_the_in_process_edits(service, cascade):
    """`/v1/images/edits` lines carry their pictures in the JSON body (base64, or a data: URL)."""
    from stages.families.deepfloyd_if import Img2ImgParams, InpaintParams
    from stages.pictures import read_edit
    from tests.serving import REPLICA_THREADS, pixels, torch_threads
    from tests.test_edits import alpha_mask, png
    from tests.test_edits import picture as test_picture

    image, mask = png(test_picture()), png(alpha_mask())
    encoded = base64.b64encode(image).decode()
    common = {"prompt": "a watercolor of a harbour", "size": "64x64", "stage1_steps": 4}
    bodies = {
        "img2img": {**common, "seed": 3, "strength": 0.6, "image": encoded},
        "inpaint": {**common, "seed": 4, "image": f"data:image/png;base64,{encoded}",
                    "mask": base64.b64encode(mask).decode()},
    }  # fmt: skip
    lines = [{"custom_id": c, "method": "POST", "url": "/v1/images/edits", "body": b} for c, b in bodies.items()]
    client = service.client()
    source = client.files.create(file=("edits.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=source.id, endpoint="/v1/images/edits", completion_window="24h")
    done = finished(client, batch.id)
    assert done.status == "completed", done.errors
    outputs = {line["custom_id"]: line["response"]["body"]["data"][0] for line in lines_of(client, done.output_file_id)}
    expected = {
        "img2img": (Img2ImgParams(prompt=common["prompt"], size=64, seed=3, stage1_steps=4, stage1_strength=0.6),
                    None),
        "inpaint": (InpaintParams(prompt=common["prompt"], size=64, seed=4, stage1_steps=4), mask),
    }  # fmt: skip
    for custom_id, (params, with_mask) in expected.items():
        with torch_threads(REPLICA_THREADS):
            reference_edit = pixels(cascade.generate(params, read_edit(image, with_mask)).image)
        assert np.array_equal(decode(outputs[custom_id]["b64_json"]), reference_edit), custom_id
    bad = {"custom_id": "x", "method": "POST", "url": "/v1/images/edits", "body": {**common, "image": "not base64!"}}
    source = client.files.create(file=("bad.jsonl", jsonl([bad])), purpose="batch")
    failed = finished(client, client.batches.create(input_file_id=source.id, endpoint="/v1/images/edits",
                                                    completion_window="24h").id)  # fmt: skip
    assert failed.status == "failed" and failed.errors.data[0].param == "body.image"


def runner_pid() -> int:
    return serve.get_deployment_handle("BatchRunner", APP_NAME).stats.remote().result()["pid"]


def restart_app(service: Service) -> None:
    serve.delete(APP_NAME)
    serve.run(build_app(service.config), name=APP_NAME, route_prefix="/")
    local_cluster.wait_ready(service.url, timeout_s=300)


def restart_ray(service: Service) -> None:
    """The whole cluster goes at once, with no Serve shutdown first (so no replica hands its work back:
    the runner's leases must run out), and a new one starts with the same database and store."""
    ray.shutdown()
    assert not ray.is_initialized()
    with Session(service.engine) as session:  # the dead runner's lines are still leased to it
        held = session.scalar(select(func.count()).where(ItemRow.state == "running", ItemRow.lease_owner.is_not(None)))
    assert held, "the lines in flight were handed back: that was a shutdown, not a crash"
    local_cluster.start(service.config, progress=lambda *_: None)


CRASHES = {
    "kill the runner": lambda service: os.kill(runner_pid(), signal.SIGKILL),
    "restart the app": restart_app,
    "restart Ray": restart_ray,
}


def attempts(service: Service, batch_id: str) -> Counter:
    with Session(service.engine) as session:
        return Counter(session.scalars(select(ItemRow.attempts).where(ItemRow.batch_id == batch_id)))


@pytest.mark.parametrize("crash", list(CRASHES))
def test_a_crash_mid_batch_loses_and_repeats_nothing(service, reference_pipes, crash):
    client = service.client()
    bodies = {f"{crash[:4]}-{i}": body(i, **({"response_format": "url"} if i % 3 == 0 else {})) for i in range(12)}
    batch = submit(client, bodies)
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 120, 0.1, "progress")
    before = client.batches.retrieve(batch.id).request_counts.completed
    CRASHES[crash](service)
    client = service.client()
    done = finished(client, batch.id)
    assert before < len(bodies), "the batch ended before the crash; make it longer"
    check_exactly_once(service, client, done, bodies, reference_pipes)
    tries = attempts(service, batch.id)
    assert max(tries) >= 2, f"no line was interrupted by the crash and run again: {tries}"


def test_cancel_keeps_what_is_done_and_runs_nothing_more(service):
    client = service.client()
    bodies = {f"cancel-{i}": body(i) for i in range(12)}
    batch = submit(client, bodies)
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, 120, 0.1, "progress")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = finished(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    outputs, errors = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
    assert Counter(line["custom_id"] for line in outputs + errors) == Counter(bodies.keys())
    assert len(errors) > 0 and {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    counts = done.request_counts
    assert (counts.completed, counts.failed) == (len(outputs), len(errors))
    with Session(service.engine) as session:  # the cancelled ones were never claimed
        attempts = dict(session.execute(select(ItemRow.custom_id, ItemRow.attempts).where(
            ItemRow.batch_id == batch.id, ItemRow.state == "skipped")).all())  # fmt: skip
    assert set(attempts) == {e["custom_id"] for e in errors} and set(attempts.values()) == {0}
    with pytest.raises(openai.ConflictError):  # the client would retry a 409 eight times
        client.with_options(max_retries=0).batches.cancel(batch.id)


GOOD = {"custom_id": "ok", "method": "POST", "url": ENDPOINT, "body": body(0, size=64)}
BAD_FILES = {
    "malformed line": ([GOOD, b'{"custom_id": "x", "method": '], 2, "invalid_json_line"),
    "duplicate custom_id": ([GOOD, GOOD], 2, "duplicate_custom_id"),
    "wrong url": ([GOOD, {**GOOD, "custom_id": "b", "url": "/v1/embeddings"}], 2, "invalid_url"),
    "wrong method": ([{**GOOD, "custom_id": "b", "method": "GET"}, GOOD], 1, "invalid_method"),
    "refused body": (
        [GOOD, {**GOOD, "custom_id": "b"}, {**GOOD, "custom_id": "c", "body": body(0, size=100)}],
        3,
        "invalid_request",
    ),
    "too many lines": ([{**GOOD, "custom_id": str(i)} for i in range(41)], 0, "too_many_lines"),
    "too many bytes": (
        [{**GOOD, "custom_id": "x" * 120_000}],  # the size is checked before any line is read
        0,
        "too_large",
    ),  # fmt: skip
}


def test_bad_input_fails_at_validating_naming_the_line_and_runs_nothing(service):
    client = service.client()
    batches = {}
    for name, (lines, _, _) in BAD_FILES.items():
        source = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batches[name] = client.batches.create(input_file_id=source.id, endpoint=ENDPOINT, completion_window="24h")
    for name, (_, line, code) in BAD_FILES.items():
        done = finished(client, batches[name].id, timeout_s=60)
        assert done.status == "failed" and done.failed_at is not None and done.in_progress_at is None, name
        assert [(e.line or 0, e.code) for e in done.errors.data] == [(line, code)], name
        assert done.request_counts.total == 0  # nothing queued, nothing run
        error_lines = lines_of(client, done.error_file_id)
        assert error_lines[0]["error"]["code"] == code and f"line {line}" in error_lines[0]["error"]["message"]


@SQLITE_ONLY
def test_bad_requests_name_the_field(service):
    client = service.client()
    source = client.files.create(file=("in.jsonl", jsonl([GOOD])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        client.batches.create(input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=source.id, endpoint=ENDPOINT, completion_window="1h")
    with pytest.raises(openai.NotFoundError, match="input_file_id"):
        client.batches.create(input_file_id="file-missing", endpoint=ENDPOINT, completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("in.jsonl", jsonl([GOOD])), purpose="fine-tune")
    too_big = service.config.batch.max_file_bytes + 1
    response = httpx.post(f"{service.url}/v1/files", headers={"Authorization": f"Bearer {service.keys['alice']}"},
                          files={"file": ("in.jsonl", b"x" * too_big)}, data={"purpose": "batch"})  # fmt: skip
    assert response.status_code == 413 and response.json()["error"]["param"] == "file"


@SQLITE_ONLY
def test_another_tenants_files_and_batches_answer_404(service):
    alice, bob = service.client("alice"), service.client("bob")
    batch = submit(alice, {"mine": body(0, size=64)})
    for call in (
        lambda: bob.batches.retrieve(batch.id),
        lambda: bob.batches.cancel(batch.id),
        lambda: bob.files.retrieve(batch.input_file_id),
        lambda: bob.files.content(batch.input_file_id),
        lambda: bob.files.delete(batch.input_file_id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert batch.id not in [b.id for b in bob.batches.list().data]
    finished(alice, batch.id)
    assert alice.files.delete(batch.input_file_id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(batch.input_file_id)


@SQLITE_ONLY
def test_the_cli_submits_follows_and_writes_pngs_named_by_custom_id(service, tmp_path, capsys):
    from serve.cli import main

    flags = ["--url", service.url, "--api-key", service.keys["alice"]]
    bodies = {"sunset/1": body(7, size=64), "as url": body(8, size=64, response_format="url")}
    source = tmp_path / "in.jsonl"
    source.write_bytes(
        jsonl([{"custom_id": c, "method": "POST", "url": ENDPOINT, "body": b} for c, b in bodies.items()])
    )
    assert main(["batch", "submit", str(source), "--wait", "--metadata", "team=art", *flags]) == 0
    batch_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["batch", "status", batch_id, *flags]) == 0
    assert "completed  (2 completed, 0 failed of 2)" in capsys.readouterr().out
    assert main(["batch", "results", batch_id, "--out", str(tmp_path / "out"), *flags]) == 0
    client = service.client()
    outputs = {line["custom_id"]: line for line in lines_of(client, client.batches.retrieve(batch_id).output_file_id)}
    for custom_id, name in (("sunset/1", "sunset_1.png"), ("as url", "as_url.png")):
        written = decode(base64.b64encode((tmp_path / "out" / name).read_bytes()).decode())
        assert np.array_equal(written, picture(outputs[custom_id]["response"]["body"]["data"][0]))
    assert main(["batch", "cancel", batch_id, *flags]) == 1  # already completed
    assert "error 409" in capsys.readouterr().err

    edits = tmp_path / "edits.jsonl"
    from tests.test_edits import picture as test_picture
    from tests.test_edits import png

    encoded = base64.b64encode(png(test_picture())).decode()
    edit = {"prompt": "a harbour", "size": "64x64", "seed": 5, "stage1_steps": 2, "strength": 0.5, "image": encoded}
    edits.write_bytes(jsonl([{"custom_id": "edit", "method": "POST", "url": "/v1/images/edits", "body": edit}]))
    assert main(["batch", "submit", str(edits), "--endpoint", "/v1/images/edits", "--wait", *flags]) == 0
    edit_batch = client.batches.retrieve(capsys.readouterr().out.strip().splitlines()[-1])
    assert edit_batch.endpoint == "/v1/images/edits" and edit_batch.request_counts.completed == 1

    long = tmp_path / "long.jsonl"
    long.write_bytes(jsonl([{"custom_id": f"l{i}", "method": "POST", "url": ENDPOINT, "body": body(i)}
                            for i in range(8)]))  # fmt: skip
    assert main(["batch", "submit", str(long), *flags]) == 0
    long_id = capsys.readouterr().out.strip().splitlines()[-1]
    assert main(["batch", "cancel", long_id, *flags]) == 0
    assert f"{long_id}  cancel" in capsys.readouterr().out  # cancelling, or already cancelled
    assert finished(client, long_id).status == "cancelled"
    assert main(["batch", "status", "batch_nope", *flags]) == 1
    assert "batch_id: no batch" in capsys.readouterr().err
