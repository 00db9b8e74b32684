"""The Batch API's pieces without Ray: input lines checked (every bad case named by line), the store's
leases (claimed once, by one runner; taken back from a dead one; a stale holder cannot finish), results
assembled into exactly one line per custom_id, cancellation, the schema's migrations, blobs written
whole, and signed image URLs. Store tests run on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, text, update

from serve.batch.lines import check_lines, items
from serve.batch.store import BatchStore, Conflict, NotFound, QuotaExceeded, jsonl
from serve.batch.tables import BatchRow, FileRow, ItemRow
from serve.blob_store import BlobStore, UrlSigner
from serve.config import parse_config
from serve.database import Database, open_database, shared_secret
from serve.served import ServedModels
from stages.errors import InvalidParameter

ENDPOINT = "/v1/images/generations"
CANCELLED = {"code": "batch_cancelled", "message": "cancelled"}


def line(custom_id: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": {"prompt": "a cat", **body}}


@pytest.fixture(scope="module")
def check_body(tiny_checkpoints):
    config = parse_config({"model": {"id": "tiny", "checkpoints": str(tiny_checkpoints)}})
    served = ServedModels.of(config, {"tiny": None})  # checking needs no orchestrator
    return served.generation


def encoded(lines: list) -> bytes:
    return b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)


def checked(check_body, lines: list, max_lines: int = 100, max_bytes: int = 1 << 20, max_line_bytes: int = 4096):
    data = encoded(lines)
    return check_lines(io.BytesIO(data), len(data), ENDPOINT, check_body, max_lines, max_bytes, max_line_bytes)


def test_good_lines_become_items_in_order(check_body):
    good = [line("a", seed=1), line("b", size="64x64")]
    out = checked(check_body, good)
    assert out.errors == [] and out.lines == 2
    assert [(n, c) for n, c, _ in items(io.BytesIO(encoded(good)), 4096)] == [(1, "a"), (2, "b")]


@pytest.mark.parametrize(
    "bad, code, param",
    [
        (b"{not json", "invalid_json_line", None),
        ([1, 2], "invalid_json_line", None),
        ({**line("x"), "method": "GET"}, "invalid_method", "method"),
        ({**line("x"), "url": "/v1/chat/completions"}, "invalid_url", "url"),
        (line("x", n=1000), "invalid_request", "body.n"),
        (line("x", size="13x13"), "invalid_request", "body.size"),
        (line("x", no_such_field=1), "invalid_request", "body.no_such_field"),
        (line("x", model="not-served"), "invalid_request", "body.model"),
        (line("x", stream=True), "invalid_request", "body.stream"),
        ({"method": "POST", "url": ENDPOINT, "body": {}}, "invalid_request", "custom_id"),
        (line("a"), "duplicate_custom_id", "custom_id"),  # line 1 is custom_id "a" too
        # Valid JSON, but not text a database, tokenizer or UTF-8 encoder takes (issue 25's first defect).
        (
            b'{"custom_id": "\\ud800", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}}',
            "invalid_request",
            "custom_id",
        ),  # fmt: skip
        (
            b'{"custom_id": "nul\\u0000", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "x"}}',
            "invalid_request",
            "custom_id",
        ),  # fmt: skip
        (line("x", prompt="a \udfff cat"), "invalid_request", "body.prompt"),
        (line("x", negative_prompt="\x00"), "invalid_request", "body.negative_prompt"),
        (line("x", user="y" * 5000), "line_too_long", None),
        (line("x" * 513), "invalid_request", "custom_id"),
    ],
)
def test_each_bad_line_is_named_by_its_number(check_body, bad, code, param):
    out = checked(check_body, [line("a"), bad, line("c")])
    assert [(e["line"], e["code"], e["param"]) for e in out.errors] == [(2, code, param)]
    assert out.errors[0]["message"].startswith("line 2: ")
    assert out.error_lines[0]["error"]["line"] == 2


def test_too_many_lines_or_bytes_fail_the_whole_file(check_body):
    many = checked(check_body, [line(str(i)) for i in range(5)], max_lines=4)
    assert [e["code"] for e in many.errors] == ["too_many_lines"]
    big = checked(check_body, [line(str(i)) for i in range(5)], max_bytes=100)
    assert [e["code"] for e in big.errors] == ["too_large"]


# ---- the store ----------------------------------------------------------------------------------------
@pytest.fixture
def store(database_url, tmp_path):
    database = Database(database_url)
    yield BatchStore(database, BlobStore(str(tmp_path / "store")))
    database.close()


def content(store: BatchStore, tenant: str, file_id: str) -> bytes:
    _, source = store.reader(tenant, file_id)
    with source:
        return source.read()


def started(store: BatchStore, tenant: str, count: int) -> str:
    data = jsonl([line(f"c{i}", seed=i) for i in range(count)])
    source = store.create_file(tenant, "in.jsonl", "batch", io.BytesIO(data))
    batch = store.create_batch(tenant, source.id, ENDPOINT, "24h", {"job": "test"})
    assert store.start(batch.id, [(i + 1, f"c{i}", {"seed": i}) for i in range(count)])
    return batch.id


def result(item, owner="a") -> dict:
    return {"id": f"batch_req_{item.id}", "custom_id": item.custom_id, "owner": owner,
            "response": {"status_code": 200, "body": {}}, "error": None}  # fmt: skip


def test_two_runners_claiming_at_once_never_take_the_same_item(store):
    batch_id = started(store, "t", 40)
    with ThreadPoolExecutor(4) as pool:
        claims = list(pool.map(lambda owner: store.claim(owner, 10, 30, {}, 100), ["a", "b", "c", "d"]))
    ids = [item.id for claim in claims for item in claim]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert store.counts([batch_id])[batch_id] == {"total": 40, "completed": 0, "failed": 0}


def test_a_tenant_gets_no_more_than_its_room(store):
    started(store, "t1", 5)
    started(store, "t2", 5)
    taken = store.claim("a", 6, 30, {"t1": 1}, 2)
    assert sorted(item.tenant_id for item in taken) == ["t1", "t2", "t2"]


def test_a_dead_runners_items_are_claimed_again_and_it_cannot_finish_them(store):
    batch_id = started(store, "t", 2)
    first = store.claim("dead", 2, 30, {}, 10)
    assert store.claim("live", 2, 30, {}, 10) == []  # leased
    with store._session.begin() as session:  # the dead runner's leases run out
        session.execute(update(ItemRow).values(lease_until=datetime.now(UTC) - timedelta(seconds=1)))
    again = store.claim("live", 2, 30, {}, 10)
    assert [i.id for i in again] == [i.id for i in first] and all(i.attempts == 2 for i in again)
    assert not store.finish(first[0], "dead", result(first[0], "dead"), 200)  # no longer its lease
    for item in again:
        assert store.finish(item, "live", result(item, "live"), 200)
    assert store.finalize(batch_id, CANCELLED) == "completed"
    output = content(store, "t", store.batch("t", batch_id).output_file_id).decode().splitlines()
    lines = [json.loads(x) for x in output]
    assert [x["custom_id"] for x in lines] == ["c0", "c1"] and {x["owner"] for x in lines} == {"live"}
    assert store.blobs.keys(f"batches/{batch_id}") == []  # the per-item results went into the file


def test_a_stale_holder_finishing_late_does_not_overwrite_the_result(store):
    """The dead runner comes back after the live one finished the item: its result is dropped, not
    written over the one the database counts."""
    batch_id = started(store, "t", 1)
    (stale,) = store.claim("slow", 1, 30, {}, 10)
    with store._session.begin() as session:
        session.execute(update(ItemRow).values(lease_until=datetime.now(UTC) - timedelta(seconds=1)))
    (fresh,) = store.claim("live", 1, 30, {}, 10)
    assert store.finish(fresh, "live", result(fresh, "live"), 200)
    failed = {**result(stale, "slow"), "response": {"status_code": 500, "body": {}}}
    assert not store.finish(stale, "slow", failed, 500)
    assert store.finalize(batch_id, CANCELLED) == "completed"
    (output,) = content(store, "t", store.batch("t", batch_id).output_file_id).splitlines()
    assert json.loads(output)["owner"] == "live"
    assert store.counts([batch_id])[batch_id] == {"total": 1, "completed": 1, "failed": 0}


def test_a_runner_renews_only_the_lines_it_runs(store):
    """A line its runner dropped without handing it back (its tenant could not be read) lapses and is
    claimed again, rather than being renewed for ever with the lines the runner still runs."""
    started(store, "t", 2)
    running, dropped = store.claim("a", 2, 0.2, {}, 10)
    time.sleep(0.3)
    assert store.renew("a", 30, [running.id]) == 1
    assert [item.id for item in store.claim("b", 2, 30, {}, 10)] == [dropped.id]


def test_renewed_leases_are_not_taken(store):
    started(store, "t", 1)
    store.claim("a", 1, 0.2, {}, 10)
    assert store.renew("a", 30) == 1
    time.sleep(0.3)
    assert store.claim("b", 1, 30, {}, 10) == []  # renewed: still a's
    with store._session.begin() as session:  # a's lease runs out; b takes the item
        session.execute(update(ItemRow).values(lease_until=datetime.now(UTC) - timedelta(seconds=1)))
    assert len(store.claim("b", 1, 30, {}, 10)) == 1
    assert store.renew("a", 30) == 0 and store.renew("b", 30) == 1  # a holds nothing any more


def test_cancel_keeps_what_is_done_and_never_runs_the_rest(store):
    batch_id = started(store, "t", 5)
    running = store.claim("a", 2, 30, {}, 10)
    store.finish(running[0], "a", result(running[0]), 200)
    store.cancel("t", batch_id)
    assert store.claim("a", 5, 30, {}, 10) == []  # nothing more starts
    assert store.finalize(batch_id, CANCELLED) is None  # one is still running
    store.finish(running[1], "a", result(running[1]), 200)
    assert store.finalize(batch_id, CANCELLED) == "cancelled"
    batch = store.batch("t", batch_id)
    assert store.counts([batch_id])[batch_id] == {"total": 5, "completed": 2, "failed": 3}
    errors = [json.loads(x) for x in content(store, "t", batch.error_file_id).splitlines()]
    assert [e["custom_id"] for e in errors] == ["c2", "c3", "c4"] and errors[0]["error"] == CANCELLED
    with pytest.raises(Conflict):
        store.cancel("t", batch_id)


def test_a_cancelled_batch_ends_though_its_running_items_are_handed_back_or_abandoned(store):
    """Cancelled while three items run: one is handed back (its stage shed it), one's runner stops and
    hands it back, one's runner dies. None of them is queued again, and the batch ends `cancelled`."""
    batch_id = started(store, "t", 4)
    shed, stopped, abandoned = (
        store.claim("a", 1, 30, {}, 10) + store.claim("b", 1, 30, {}, 10) + store.claim("dead", 1, 30, {}, 10)
    )
    store.cancel("t", batch_id)
    store.release_item(shed, "a")
    assert store.release("b") == 1
    assert store.skip_abandoned() == 0  # the dead runner's lease has not run out yet
    assert store.finalize(batch_id, CANCELLED) is None
    with store._session.begin() as session:
        session.execute(update(ItemRow).where(ItemRow.id == abandoned.id).values(
            lease_until=datetime.now(UTC) - timedelta(seconds=1)))  # fmt: skip
    assert store.skip_abandoned() == 1
    assert store.claim("c", 4, 30, {}, 10) == []
    assert store.finalize(batch_id, CANCELLED) == "cancelled"
    assert store.counts([batch_id])[batch_id] == {"total": 4, "completed": 0, "failed": 4}


def test_an_expired_batch_runs_nothing_more(store):
    batch_id = started(store, "t", 3)
    (running,) = store.claim("a", 1, 30, {}, 10)
    with store._session.begin() as session:
        session.execute(update(BatchRow).where(BatchRow.id == batch_id).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))  # fmt: skip
    assert store.expire_overdue() == [batch_id]
    assert store.claim("a", 3, 30, {}, 10) == []
    store.release_item(running, "a")  # handed back past the window: skipped, not queued
    assert store.finalize(batch_id, {"code": "batch_expired", "message": "expired"}) == "expired"
    batch = store.batch("t", batch_id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert store.counts([batch_id])[batch_id] == {"total": 3, "completed": 0, "failed": 3}


def test_another_tenant_sees_nothing(store):
    batch_id = started(store, "owner", 1)
    file_id = store.batch("owner", batch_id).input_file_id
    for call in (lambda: store.batch("other", batch_id), lambda: store.file("other", file_id),
                 lambda: store.reader("other", file_id), lambda: store.cancel("other", batch_id),
                 lambda: store.delete_file("other", file_id)):  # fmt: skip
        with pytest.raises(NotFound):
            call()
    assert store.batches("other") == ([], False) and store.files("other") == []


def test_batches_are_listed_newest_first_in_pages(store):
    ids = [started(store, "t", 1) for _ in range(5)]
    first, more = store.batches("t", limit=2)
    second, _ = store.batches("t", limit=2, after=first[-1].id)
    assert more and [b.id for b in first + second] == ids[::-1][:4]


def test_a_batch_needs_a_batch_file_and_a_known_window(store):
    source = store.create_file("t", "in.jsonl", "batch", io.BytesIO(b"{}\n"))
    with pytest.raises(InvalidParameter, match="completion_window"):
        store.create_batch("t", source.id, ENDPOINT, "1h", None)
    with pytest.raises(NotFound):
        store.create_batch("t", "file-nope", ENDPOINT, "24h", None)


def test_migrations_run_once_and_adopt_a_database_made_before_them(database_url):
    engine = open_database(database_url)
    open_database(database_url).dispose()  # a second opener finds the schema current
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0003"
    assert {"tenants", "api_keys", "batches", "batch_items", "batch_files"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_a_pre_migration_tenants_database_is_adopted(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the schema issue 12 made with create_all, with a tenant in it
        db.execute("CREATE TABLE tenants (id INTEGER PRIMARY KEY, name VARCHAR(64) UNIQUE, priority VARCHAR(16), "
                   "weight FLOAT, rpm INTEGER, ipm INTEGER, max_concurrent INTEGER, created_at DATETIME)")  # fmt: skip
        db.execute("CREATE TABLE api_keys (id VARCHAR(32) PRIMARY KEY, tenant_id INTEGER, sha256 VARCHAR(64), "
                   "prefix VARCHAR(16), created_at DATETIME, revoked_at DATETIME)")  # fmt: skip
        db.execute("INSERT INTO tenants VALUES (1, 'old', 'batch', 1.0, NULL, NULL, NULL, '2026-01-01 00:00:00')")
    from serve.tenancy.store import TenantStore

    with TenantStore(f"sqlite:///{path}") as tenants:
        assert tenants.tenant("old").priority == "batch"


# ---- blobs and signed URLs ----------------------------------------------------------------------------
def test_blobs_appear_whole_and_a_dead_writers_leftover_is_replaced(tmp_path):
    blobs = BlobStore(str(tmp_path))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / ".x.tmp").write_bytes(b"half")  # a writer died half-way
    blobs.write("files/x", b"whole")
    assert blobs.read("files/x") == b"whole" and blobs.keys() == ["files/x"]
    with pytest.raises(ValueError):
        blobs.write("../escape", b"")


def test_sweep_deletes_only_old_blobs(tmp_path):
    blobs = BlobStore(str(tmp_path))
    blobs.write("images/a/old.png", b"1")
    blobs.write("images/a/new.png", b"2")
    old = time.time() - 7200
    os.utime(tmp_path / "images/a/old.png", (old, old))
    assert blobs.sweep("images", 3600) == 1 and blobs.keys("images") == ["images/a/new.png"]


def test_the_sweep_deletes_file_blobs_no_row_names_once_old(store):
    kept = store.create_file("t", "in.jsonl", "batch", io.BytesIO(jsonl([line("a")])))
    store.blobs.write("files/file-died-before-its-row", b"x")  # a process died between blob and row
    store.blobs.write("files/file-written-just-now", b"y")  # its row may be committing as we sweep
    root = store.blobs.root
    (Path(root) / "files" / ".file-died-half-way.tmp").write_bytes(b"half")
    old = time.time() - 7200
    for name in (kept.blob, "files/file-died-before-its-row", "files/.file-died-half-way.tmp"):
        os.utime(Path(root) / name, (old, old))
    assert store.sweep_orphan_files(3600) == 2
    assert store.blobs.keys("files") == sorted([kept.blob, "files/file-written-just-now"])
    assert content(store, "t", kept.id) == jsonl([line("a")])


def test_signed_urls_expire_and_refuse_tampering():
    signer = UrlSigner(b"k" * 32, ttl_s=60)
    link = signer.sign("/v1/images/files/o/n.png")
    path, query = link.split("?")
    params = dict(part.split("=") for part in query.split("&"))
    assert signer.check(path, params["expires"], params["signature"]) is None
    assert signer.check("/v1/images/files/o/other.png", params["expires"], params["signature"]) == "bad signature"
    assert signer.check(path, str(int(params["expires"]) + 60), params["signature"]) == "bad signature"
    assert UrlSigner(b"x" * 32, 60).check(path, params["expires"], params["signature"]) == "bad signature"
    old = signer.sign(path, now=time.time() - 120)
    expired = dict(part.split("=") for part in old.split("?")[1].split("&"))
    assert signer.check(path, expired["expires"], expired["signature"]) == "expired"


def test_every_process_reads_the_same_signing_secret(database_url):
    first, second = Database(database_url), Database(database_url)
    assert shared_secret(first, "k") == shared_secret(second, "k") and len(shared_secret(first, "k")) == 32
    first.close()
    second.close()


# ---- issue 25: what no line, batch or tenant may do to the others ---------------------------------------
def expire_leases(store: BatchStore) -> None:
    with store._session.begin() as session:
        session.execute(update(ItemRow).values(lease_until=datetime.now(UTC) - timedelta(seconds=1)))


def test_a_line_whose_runners_keep_dying_is_abandoned_after_its_tries_not_retried_for_ever(store):
    batch_id = started(store, "t", 2)
    for attempt in range(1, 4):
        taken = store.claim(f"runner-{attempt}", 2, 30, {}, 10, max_attempts=3)
        assert [item.attempts for item in taken] == [attempt, attempt]  # each runner died holding them
        expire_leases(store)
    assert store.claim("runner-4", 2, 30, {}, 10, max_attempts=3) == []  # abandoned, not claimed a fourth time
    assert store.finalize(batch_id, CANCELLED) == "completed"
    assert store.counts([batch_id])[batch_id] == {"total": 2, "completed": 0, "failed": 2}
    errors = [json.loads(x) for x in content(store, "t", store.batch("t", batch_id).error_file_id).splitlines()]
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("c0", "runner_failed"), ("c1", "runner_failed")]


def test_a_line_held_back_by_its_tenants_limits_is_not_counted_as_a_try(store):
    started(store, "t", 1)
    (item,) = store.claim("a", 1, 30, {}, 10)
    store.release_item(item, "a", tried=False)
    (again,) = store.claim("a", 1, 30, {}, 10)
    assert again.attempts == 1


def test_finalize_streams_the_output_instead_of_holding_it(store):
    """Issue 25, finding 1: 64 results of 256 KiB (16 MiB of output) are assembled with a few hundred KiB
    of Python memory at most, not the whole output (and its copies)."""
    count, size = 64, 256 << 10
    batch_id = started(store, "t", count)
    taken = store.claim("a", count, 30, {}, count)
    for item in taken:
        payload = {**result(item), "response": {"status_code": 200, "body": {"data": [{"b64_json": "x" * size}]}}}
        assert store.finish(item, "a", payload, 200)
    tracemalloc.start()
    try:
        assert store.finalize(batch_id, CANCELLED) == "completed"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    output = store.batch("t", batch_id).output_file_id
    assert store.file("t", output).bytes > count * size
    assert peak < 8 * size, f"finalize held {peak / 2**20:.1f} MiB at once"
    assert [json.loads(x)["custom_id"] for x in content(store, "t", output).splitlines()] == [
        f"c{i}" for i in range(count)
    ]


def test_a_result_the_store_lost_becomes_an_error_line_instead_of_stopping_the_batch(store):
    batch_id = started(store, "t", 2)
    for item in store.claim("a", 2, 30, {}, 10):
        store.finish(item, "a", result(item), 200)
    store.blobs.delete(f"batches/{batch_id}/results/{1:08d}.json")
    assert store.finalize(batch_id, CANCELLED) == "completed"
    batch = store.batch("t", batch_id)
    [error] = [json.loads(x) for x in content(store, "t", batch.error_file_id).splitlines()]
    assert error["custom_id"] == "c0" and error["error"]["code"] == "result_lost"


def test_output_files_expire_with_their_batch_and_are_swept(store):
    store.output_ttl_s = 60
    batch_id = started(store, "t", 1)
    (item,) = store.claim("a", 1, 30, {}, 10)
    store.finish(item, "a", result(item), 200)
    store.finalize(batch_id, CANCELLED)
    batch = store.batch("t", batch_id)
    output = store.file("t", batch.output_file_id)
    assert output.expires_at == batch.expires_at + timedelta(seconds=60)
    assert output.openai()["expires_at"] == int(output.expires_at.timestamp())
    assert store.sweep_expired_files() == 0
    with store._session.begin() as session:
        session.execute(update(FileRow).where(FileRow.id == output.id).values(
            expires_at=datetime.now(UTC) - timedelta(seconds=1)))  # fmt: skip
    assert store.sweep_expired_files() == 1
    with pytest.raises(NotFound):
        store.file("t", output.id)
    assert store.blobs.keys("files") == [store.file("t", batch.input_file_id).blob]


def test_a_tenants_files_are_held_to_its_quota_and_a_refused_upload_leaves_nothing(store):
    store.max_tenant_bytes = 100
    store.create_file("t", "a.jsonl", "batch", io.BytesIO(b"x" * 60))
    with pytest.raises(QuotaExceeded, match="batch.max_tenant_bytes"):
        store.check_quota("t", 41)
    with pytest.raises(QuotaExceeded):
        store.create_file("t", "b.jsonl", "batch", io.BytesIO(b"y" * 41))
    store.check_quota("other", 100)  # another tenant's quota is its own
    assert store.stored_bytes("t") == 60 and len(store.blobs.keys("files")) == 1


def test_deleted_tenants_batches_and_files_are_purged_and_no_one_elses(store):
    from serve.tenancy.store import TenantStore

    tenants = TenantStore(store.database)
    doomed, kept = tenants.create_tenant("doomed"), tenants.create_tenant("kept")
    gone, mine, default = (started(store, tenant, 2) for tenant in (doomed.id, kept.id, "default"))
    store.claim("a", 1, 30, {kept.id: 0, "default": 0}, 10)  # a line of the doomed tenant is running
    assert store.purge_deleted_tenants() == []  # every tenant still exists
    tenants.delete_tenant("doomed")
    assert store.purge_deleted_tenants() == [doomed.id]
    with pytest.raises(NotFound):
        store.batch(None, gone)
    assert store.files(doomed.id) == []
    assert {store.batch(None, b).status for b in (mine, default)} == {"in_progress"}  # the config's keys' too
    inputs = {store.batch(None, b).input_file_id for b in (mine, default)}
    assert {key.split("/")[1] for key in store.blobs.keys("files")} == inputs
    assert store.purge_deleted_tenants() == []


def test_on_sqlite_a_read_does_not_wait_for_a_writer_and_no_result_is_written_under_the_lock(tmp_path):
    """Issue 25, finding 10: reads were BEGIN IMMEDIATE too (waiting for any writer, up to the busy
    timeout), and `finish` wrote its result blob while holding the write lock."""
    path = tmp_path / "app.db"
    held_while_writing: list[bool] = []

    class ProbingBlobs(BlobStore):
        def stage(self, key, data, writer=""):
            probe = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                probe.execute("BEGIN IMMEDIATE")
                probe.execute("ROLLBACK")
                held_while_writing.append(False)
            except sqlite3.OperationalError:  # database is locked
                held_while_writing.append(True)
            finally:
                probe.close()
            return super().stage(key, data, writer)

    database = Database(f"sqlite:///{path}")
    store = BatchStore(database, ProbingBlobs(str(tmp_path / "store")))
    batch_id = started(store, "t", 1)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    try:
        with ThreadPoolExecutor(1) as pool:
            read = pool.submit(lambda: (store.batch("t", batch_id).status, store.counts([batch_id])[batch_id]))
            assert read.result(timeout=10) == ("in_progress", {"total": 1, "completed": 0, "failed": 0})
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    (item,) = store.claim("a", 1, 30, {}, 10)
    assert store.finish(item, "a", result(item), 200)
    assert held_while_writing == [False]
    database.close()
