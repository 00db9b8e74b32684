"""The Batch API's state: files, batches and items in the SQL database, their blobs in the fsspec store.

Every change is one transaction. Blobs are written before the rows that name them, at keys fixed by
their ids, and rows are deleted before their blobs, so a process that dies between the two never leaves
a row without its blob. What it can leave is a blob without a row: a batch's results and output files
are rewritten by the next runner at the same keys, and `sweep_orphan_files` deletes an uploaded file's
blob that no row names.

Items are claimed with a lease: `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL (two runners never
take the same row and never wait for each other), `BEGIN IMMEDIATE` on SQLite (serve/database.py). A
runner renews its leases while it works; a dead runner's items are claimed again once theirs run out,
at most `max_attempts` times in all: an item whose runners kept dying is abandoned (an error line), so
no line can stop a batch for ever. An item's result is staged beside its key first, then, while its row
is locked by the lease's holder, renamed into place and the item marked done in the same transaction:
each input line ends with exactly one result, whichever runner finished it, and no lock is held while a
result is written. Items of a stopping batch (cancelled, or past its window) that are handed back, or
whose runner died, are skipped rather than queued, so the batch always ends.

Nothing here holds a whole file in memory: uploads are copied into the store a chunk at a time, a batch's
items are inserted in chunks, and its output and error files are written line by line.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, BinaryIO

from sqlalchemy import column, delete, func, insert, or_, select, table, text, update
from sqlalchemy.orm import Session

from serve.batch.tables import (
    ABANDONED,
    CANCELLED,
    CANCELLING,
    COMPLETED,
    DONE,
    ERRORED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    QUEUED,
    RUNNING,
    SKIPPED,
    SUCCEEDED,
    TERMINAL,
    VALIDATING,
    WITHOUT_RESULT,
    BatchRow,
    FileRow,
    ItemRow,
)
from serve.blob_store import BlobStore
from serve.database import Database
from stages.errors import InvalidParameter

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
ORPHAN_GRACE_S = 3600.0  # a blob without a row is deleted only when older; far beyond a blob-then-row write
INSERT_CHUNK = 500  # items inserted per statement when a batch starts
ABANDONED_ERROR = {"code": "runner_failed", "message": "the batch runner stopped while running this request, every "
                   "time it was tried; it was not tried again"}  # fmt: skip


class NotFound(Exception):
    """No such file or batch for this tenant (another tenant's answers the same)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class Conflict(Exception):
    """The batch is not in a state that allows this (e.g. cancelling a completed batch)."""


class QuotaExceeded(Exception):
    """The tenant's files would take more than `batch.max_tenant_bytes`."""


@dataclass(frozen=True)
class Claimed:
    """An item a runner holds: what it needs to run it and to write its result."""

    id: int
    batch_id: str
    endpoint: str
    line: int
    custom_id: str
    tenant_id: str
    body: dict[str, Any]
    attempts: int


def _now() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def result_key(batch_id: str, line: int) -> str:
    return f"batches/{batch_id}/results/{line:08d}.json"


def file_key(file_id: str) -> str:
    return f"files/{file_id}"


def _stopping():
    """The ids of batches that run nothing more: cancelled, or past their completion window."""
    return select(BatchRow.id).where(or_(BatchRow.status == CANCELLING, BatchRow.expired_at.is_not(None)))


def _stored(tenant_id: str):
    """The bytes of a tenant's files."""
    return select(func.coalesce(func.sum(FileRow.bytes), 0)).where(FileRow.tenant_id == tenant_id)


def json_line(line: dict) -> bytes:
    return json.dumps(line, separators=(",", ":")).encode() + b"\n"


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json_line(line) for line in lines)


class BatchStore:
    def __init__(self, database: Database, blobs: BlobStore, output_ttl_s: float = 30 * 86400,
                 max_tenant_bytes: int | None = None):  # fmt: skip
        """`output_ttl_s`: how long a batch's output and error files are kept after its completion window
        ends; `max_tenant_bytes`: most bytes of files one tenant may keep (None: no limit)."""
        self.database, self.blobs = database, blobs
        self.output_ttl_s, self.max_tenant_bytes = output_ttl_s, max_tenant_bytes
        self._session = database.sessions

    @property
    def _skip_locked(self) -> bool:
        return not self.database.sqlite

    # ---- files ------------------------------------------------------------------------------------------
    def stored_bytes(self, tenant_id: str) -> int:
        with self._session() as session:
            return session.scalar(_stored(tenant_id))

    def check_quota(self, tenant_id: str, more: int, session: Session | None = None) -> None:
        """QuotaExceeded if the tenant's files and `more` bytes exceed its quota (before an upload is read,
        and again, in the transaction that records it)."""
        if self.max_tenant_bytes is None:
            return
        if session is None:
            with self._session() as session:
                return self.check_quota(tenant_id, more, session)
        if session.scalar(_stored(tenant_id)) + more > self.max_tenant_bytes:
            raise QuotaExceeded(f"file: this key's files would take more than {self.max_tenant_bytes} bytes "
                                "(batch.max_tenant_bytes); delete some first")  # fmt: skip

    def create_file(self, tenant_id: str, filename: str, purpose: str, source: BinaryIO) -> FileRow:
        """Copy an uploaded file (a file object, read a chunk at a time) into the store and record it."""
        return self.record_file(self.store_file(tenant_id, filename, purpose, source))

    def store_file(self, tenant_id: str, filename: str, purpose: str, source: BinaryIO) -> FileRow:
        """An upload's blob, copied into the store: the row to record (`record_file`), not yet recorded."""
        row = FileRow(id=new_id("file-"), tenant_id=tenant_id, filename=filename[:255], purpose=purpose, bytes=0,
                      created_at=_now())  # fmt: skip
        row.blob = file_key(row.id)
        row.bytes = self.blobs.write_from(row.blob, source)
        return row

    def record_file(self, row: FileRow) -> FileRow:
        """Record a stored upload within its tenant's quota (its blob is deleted if that fails). On
        PostgreSQL one upload of a tenant is recorded at a time, so two cannot both fit the same room."""
        try:
            with self._session.begin() as session:
                if self.max_tenant_bytes is not None and not self.database.sqlite:  # SQLite: its write lock
                    session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:tenant))"), {"tenant": row.tenant_id})
                self.check_quota(row.tenant_id, row.bytes, session)
                session.add(row)
        except BaseException:
            self.blobs.delete(row.blob)
            raise
        return row

    def file(self, tenant_id: str | None, file_id: str) -> FileRow:
        """The file (`tenant_id` None: whoever owns it, for the runner)."""
        with self._session() as session:
            row = session.get(FileRow, file_id)
        if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
            raise NotFound("file_id", f"no file {file_id!r}")
        return row

    def files(self, tenant_id: str, purpose: str | None = None) -> list[FileRow]:
        query = select(FileRow).where(FileRow.tenant_id == tenant_id).order_by(FileRow.created_at.desc(), FileRow.id)
        if purpose is not None:
            query = query.where(FileRow.purpose == purpose)
        with self._session() as session:
            return list(session.scalars(query))

    def reader(self, tenant_id: str | None, file_id: str) -> tuple[FileRow, BinaryIO]:
        """The file's row and its content as a file object to read in chunks (the caller closes it)."""
        row = self.file(tenant_id, file_id)
        return row, self.blobs.reader(row.blob)

    def delete_file(self, tenant_id: str, file_id: str) -> None:
        with self._session.begin() as session:
            row = session.get(FileRow, file_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFound("file_id", f"no file {file_id!r}")
            session.delete(row)
        self.blobs.delete(row.blob)

    # ---- batches ----------------------------------------------------------------------------------------
    def create_batch(
        self, tenant_id: str, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None
    ) -> BatchRow:
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidParameter("completion_window", f"must be one of {', '.join(COMPLETION_WINDOWS)}")
        try:
            source = self.file(tenant_id, input_file_id)
        except NotFound:
            raise NotFound("input_file_id", f"no file {input_file_id!r}") from None
        if source.purpose != "batch":
            raise InvalidParameter("input_file_id", f"file {input_file_id!r} has purpose {source.purpose!r}, not batch")
        now = _now()
        row = BatchRow(id=new_id("batch_"), tenant_id=tenant_id, endpoint=endpoint, input_file_id=input_file_id,
                       completion_window=completion_window, status=VALIDATING, metadata_=metadata, created_at=now,
                       expires_at=now + COMPLETION_WINDOWS[completion_window])  # fmt: skip
        with self._session.begin() as session:
            session.add(row)
        return row

    def batch(self, tenant_id: str | None, batch_id: str) -> BatchRow:
        """The batch (`tenant_id` None: whoever owns it, for the runner)."""
        with self._session() as session:
            row = session.get(BatchRow, batch_id)
        if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
            raise NotFound("batch_id", f"no batch {batch_id!r}")
        return row

    def batches(self, tenant_id: str, limit: int = 20, after: str | None = None) -> tuple[list[BatchRow], bool]:
        """The tenant's batches, newest first, after the one named; and whether there are more."""
        query = select(BatchRow).where(BatchRow.tenant_id == tenant_id)
        with self._session() as session:
            if after is not None:
                cursor = session.get(BatchRow, after)
                if cursor is None or cursor.tenant_id != tenant_id:
                    raise NotFound("after", f"no batch {after!r}")
                query = query.where(
                    or_(BatchRow.created_at < cursor.created_at,
                        (BatchRow.created_at == cursor.created_at) & (BatchRow.id > cursor.id))
                )  # fmt: skip
            rows = list(session.scalars(query.order_by(BatchRow.created_at.desc(), BatchRow.id).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def counts(self, batch_ids: list[str]) -> dict[str, dict[str, int]]:
        """OpenAI's request_counts of each batch: total, completed, failed (skipped and abandoned items
        count as failed: they are in the error file)."""
        query = (
            select(ItemRow.batch_id, ItemRow.state, func.count())
            .where(ItemRow.batch_id.in_(batch_ids))
            .group_by(ItemRow.batch_id, ItemRow.state)
        )
        tally: dict[str, Counter] = {batch_id: Counter() for batch_id in batch_ids}
        with self._session() as session:
            for batch_id, state, count in session.execute(query):
                tally[batch_id][state] += count
        return {
            batch_id: {
                "total": sum(c.values()),
                "completed": c[SUCCEEDED],
                "failed": c[ERRORED] + c[SKIPPED] + c[ABANDONED],
            }  # fmt: skip
            for batch_id, c in tally.items()
        }

    def cancel(self, tenant_id: str, batch_id: str) -> BatchRow:
        """Stop a batch: items not yet claimed never run; the runner finishes the others and then writes
        what was done (`cancelling`, then `cancelled`)."""
        with self._session.begin() as session:
            row = session.get(BatchRow, batch_id)
            if row is None or row.tenant_id != tenant_id:
                raise NotFound("batch_id", f"no batch {batch_id!r}")
            if row.status in (*TERMINAL, FINALIZING):
                raise Conflict(f"batch {batch_id} is {row.status}; only a validating or in_progress batch cancels")
            if row.status != CANCELLING:
                row.status, row.cancelling_at = CANCELLING, _now()
                self._skip_queued(session, batch_id)
        return row

    # ---- the runner's side ------------------------------------------------------------------------------
    def with_status(self, *statuses: str) -> list[BatchRow]:
        with self._session() as session:
            query = select(BatchRow).where(BatchRow.status.in_(statuses)).order_by(BatchRow.created_at)
            return list(session.scalars(query))

    def start(self, batch_id: str, items: Iterable[tuple[int, str, dict]]) -> bool:
        """A validated batch's items (line, custom_id, body), queued, in chunks but in one transaction (all
        of them or none); False if it was cancelled meanwhile."""
        with self._session.begin() as session:
            row = session.get(BatchRow, batch_id, with_for_update=True)
            if row is None or row.status != VALIDATING:
                return False
            rows = (
                dict(
                    batch_id=batch_id,
                    line=line,
                    custom_id=custom_id,
                    tenant_id=row.tenant_id,
                    body=body,
                    state=QUEUED,
                    attempts=0,
                )  # fmt: skip
                for line, custom_id, body in items
            )
            while chunk := list(islice(rows, INSERT_CHUNK)):
                session.execute(insert(ItemRow), chunk)
            row.status, row.in_progress_at = IN_PROGRESS, _now()
        return True

    def fail(self, batch_id: str, errors: list[dict], error_lines: list[dict]) -> None:
        """A batch that failed validation (or could not be run): its errors, and an error file naming the
        lines."""
        error_file = FileRow(id=f"file-{batch_id}-errors", tenant_id="", filename=f"{batch_id}_error.jsonl",
                             purpose="batch_output", bytes=0, created_at=_now())  # fmt: skip
        data = jsonl(error_lines)
        error_file.blob, error_file.bytes = file_key(error_file.id), len(data)
        self.blobs.write(error_file.blob, data)
        with self._session.begin() as session:
            row = session.get(BatchRow, batch_id, with_for_update=True)
            if row is None or row.status in TERMINAL:
                return
            error_file.tenant_id, error_file.expires_at = row.tenant_id, self._output_expiry(row)
            session.merge(error_file)
            row.status, row.failed_at, row.errors, row.error_file_id = FAILED, _now(), errors, error_file.id
            self._skip_queued(session, batch_id)

    def claim(
        self,
        owner: str,
        limit: int,
        lease_s: float,
        room: dict[str, int],
        per_tenant: int,
        max_attempts: int = 3,
    ) -> list[Claimed]:
        """Up to `limit` items of running batches, never more of a tenant than its `room` (unlisted:
        `per_tenant`): tenants in order of their oldest waiting item, each tenant's oldest first. Items
        whose lease ran out (their runner died) are taken again, unless they were tried `max_attempts`
        times already: those are abandoned."""
        now = _now()
        lost = (ItemRow.state == RUNNING) & (ItemRow.lease_until < now)
        claimable = (
            select(ItemRow)
            .join(BatchRow, BatchRow.id == ItemRow.batch_id)
            .where(BatchRow.status == IN_PROGRESS, BatchRow.expired_at.is_(None))
            .where(or_(ItemRow.state == QUEUED, lost))
        )
        taken: list[Claimed] = []
        with self._session.begin() as session:
            session.execute(
                update(ItemRow)
                .where(lost, ItemRow.attempts >= max_attempts)
                .values(state=ABANDONED, lease_owner=None, lease_until=None)
            )
            waiting = select(ItemRow.tenant_id, func.min(ItemRow.id).label("oldest")).where(
                ItemRow.id.in_(claimable.with_only_columns(ItemRow.id))
            )
            tenants = [tenant for tenant, _ in session.execute(waiting.group_by(ItemRow.tenant_id).order_by("oldest"))]
            for tenant in tenants:
                want = min(room.get(tenant, per_tenant), limit - len(taken))
                if want <= 0:
                    continue
                # Lock only what is taken: rows locked and left would be skipped by the other runners.
                query = claimable.where(ItemRow.tenant_id == tenant).order_by(ItemRow.id).limit(want)
                if self._skip_locked:
                    query = query.with_for_update(skip_locked=True, of=ItemRow)
                for item, endpoint in session.execute(query.add_columns(BatchRow.endpoint)):
                    item.state, item.lease_owner, item.lease_until = RUNNING, owner, now + timedelta(seconds=lease_s)
                    item.attempts += 1
                    taken.append(Claimed(item.id, item.batch_id, endpoint, item.line, item.custom_id, item.tenant_id,
                                         item.body, item.attempts))  # fmt: skip
        return taken

    def renew(self, owner: str, lease_s: float, ids: Collection[int] | None = None) -> int:
        """Extend the leases `owner` still holds (one run out but not yet taken by another too), only those of
        `ids` when given (the lines it is running: one it dropped lapses and is claimed again); how many."""
        held = (ItemRow.lease_owner == owner) & (ItemRow.state == RUNNING)
        if ids is not None:
            held = held & ItemRow.id.in_(list(ids))
        until = _now() + timedelta(seconds=lease_s)
        with self._session.begin() as session:
            return session.execute(update(ItemRow).where(held).values(lease_until=until)).rowcount

    def finish(self, item: Claimed, owner: str, line: dict, status_code: int | None) -> bool:
        """Write the item's result line and mark it done, if `owner` still holds it (False otherwise: its
        lease ran out and another runner took it, whose result stands). The result is staged first, with no
        lock held; the row stays locked from the check to the commit, with only the rename in between, so
        no other runner can take it meanwhile and no stale result overwrites one."""
        state = SUCCEEDED if status_code == 200 else ERRORED
        key = result_key(item.batch_id, item.line)
        staged = self.blobs.stage(key, json_line(line), writer=owner)
        with self._session.begin() as session:
            held = session.scalar(
                select(ItemRow)
                .where(ItemRow.id == item.id, ItemRow.lease_owner == owner, ItemRow.state == RUNNING)
                .with_for_update()
            )
            if held is not None:
                self.blobs.commit(staged, key)
                held.state, held.status_code, held.lease_owner, held.lease_until = state, status_code, None, None
        if held is None:
            self.blobs.discard(staged)
            return False
        return True

    def release(self, owner: str) -> int:
        """Hand `owner`'s unfinished items back (a runner shutting down), so others take them at once."""
        with self._session.begin() as session:
            return self._hand_back(session, (ItemRow.lease_owner == owner) & (ItemRow.state == RUNNING))

    def release_item(self, item: Claimed, owner: str, tried: bool = True) -> None:
        """Hand one item back to the queue: its stage shed it or failed (`tried`: it counts as a try), or its
        tenant's limits held it back (not a try)."""
        with self._session.begin() as session:
            held = (ItemRow.id == item.id) & (ItemRow.lease_owner == owner) & (ItemRow.state == RUNNING)
            if not tried:
                session.execute(update(ItemRow).where(held).values(attempts=ItemRow.attempts - 1))
            self._hand_back(session, held)

    def _hand_back(self, session: Session, which) -> int:
        """The items back in the queue, or skipped where their batch is stopping (cancelled or past its
        window): nothing would claim them there, and the batch could never end."""
        free = dict(lease_owner=None, lease_until=None)
        stopping = ItemRow.batch_id.in_(_stopping())
        skipped = session.execute(update(ItemRow).where(which, stopping).values(state=SKIPPED, **free)).rowcount
        queued = session.execute(update(ItemRow).where(which).values(state=QUEUED, **free)).rowcount
        return skipped + queued

    def expire_overdue(self) -> list[str]:
        """Batches past their completion window stop: their unclaimed items are skipped."""
        with self._session.begin() as session:
            rows = session.scalars(
                select(BatchRow).where(BatchRow.status == IN_PROGRESS, BatchRow.expires_at < _now())
            ).all()
            for row in rows:
                row.expired_at = _now()  # `expired` once the items in flight are done (finalize)
                self._skip_queued(session, row.id)
            return [row.id for row in rows]

    def skip_abandoned(self) -> int:
        """Items of stopping batches (cancelled, or past their window) whose runner died holding them: their
        leases ran out, and nothing will claim them again, so they are skipped and their batch can end."""
        with self._session.begin() as session:
            return session.execute(
                update(ItemRow)
                .where(ItemRow.batch_id.in_(_stopping()), ItemRow.state == RUNNING, ItemRow.lease_until < _now())
                .values(state=SKIPPED, lease_owner=None, lease_until=None)
            ).rowcount

    def unfinished(self, batch_id: str) -> int:
        """Items still queued or running."""
        with self._session() as session:
            query = select(func.count()).where(ItemRow.batch_id == batch_id, ItemRow.state.not_in(DONE))
            return session.scalar(query)

    def _output_expiry(self, row: BatchRow) -> datetime:
        """When a batch's output and error files (and the `url` images they link) are deleted."""
        return row.expires_at + timedelta(seconds=self.output_ttl_s)

    def finalize(self, batch_id: str, skipped_error: dict[str, str]) -> str | None:
        """Write the output and error files of a batch whose items are all done, and end it: completed,
        cancelled or expired. Returns the new status (None: not ready, or already ended). The files are
        written a line at a time, in input order; a result that cannot be read becomes an error line."""
        row = self.batch(None, batch_id)
        if row.status in TERMINAL or self.unfinished(batch_id):
            return None
        with self._session.begin() as session:
            current = session.get(BatchRow, batch_id, with_for_update=True)
            if current is None or current.status in TERMINAL:
                return None
            if current.status == IN_PROGRESS:
                current.status = FINALIZING
            current.finalizing_at = _now()
        expires = self._output_expiry(row)
        files = {
            kind: FileRow(
                id=f"file-{batch_id}-{kind}",
                tenant_id=row.tenant_id,
                filename=f"{batch_id}_{kind}.jsonl",
                purpose="batch_output",
                bytes=0,
                blob=file_key(f"file-{batch_id}-{kind}"),
                created_at=_now(),
                expires_at=expires,
            )  # fmt: skip
            for kind in ("output", "error")
        }
        lost = {SKIPPED: skipped_error, ABANDONED: ABANDONED_ERROR}
        with self.blobs.writer(files["output"].blob) as output, self.blobs.writer(files["error"].blob) as error:
            for item in self._items(batch_id):
                if item.state in WITHOUT_RESULT:
                    error.write(json_line({"id": f"batch_req_{item.id}", "custom_id": item.custom_id,
                                           "response": None, "error": lost[item.state]}))  # fmt: skip
                    continue
                try:
                    data = self.blobs.read(result_key(batch_id, item.line))
                    json.loads(data)
                except (OSError, ValueError):  # the store lost it: the line still ends, as an error
                    data = json_line(
                        {
                            "id": f"batch_req_{item.id}",
                            "custom_id": item.custom_id,
                            "response": None,
                            "error": {"code": "result_lost", "message": "this request's result was lost"},
                        }
                    )
                    error.write(data)  # fmt: skip
                    continue
                (output if item.state == SUCCEEDED else error).write(data)
            sizes = {"output": output.tell(), "error": error.tell()}
        kept = [file for kind, file in files.items() if sizes[kind]]
        for kind, file in files.items():
            file.bytes = sizes[kind]
            if not sizes[kind]:
                self.blobs.delete(file.blob)
        ended = CANCELLED if row.status == CANCELLING else EXPIRED if row.expired_at else COMPLETED
        with self._session.begin() as session:
            current = session.get(BatchRow, batch_id, with_for_update=True)
            if current is None or current.status in TERMINAL:
                return None
            for file in kept:
                session.merge(file)
            current.output_file_id = files["output"].id if sizes["output"] else None
            current.error_file_id = files["error"].id if sizes["error"] else None
            current.status = ended
            setattr(current, f"{ended}_at", current.expired_at if ended == EXPIRED else _now())
        self.blobs.delete(f"batches/{batch_id}")  # the per-item results now live in the files
        return ended

    def _items(self, batch_id: str) -> Iterator[ItemRow]:
        """The batch's items in input order, fetched a chunk at a time."""
        with self._session() as session:
            query = select(ItemRow).where(ItemRow.batch_id == batch_id).order_by(ItemRow.line)
            yield from session.scalars(query.execution_options(yield_per=INSERT_CHUNK))

    def fail_running(self, batch_id: str, error: dict[str, Any]) -> bool:
        """End a batch that could not be validated or finalized however often it was tried: `failed`,
        with `error`; its queued items are skipped. False if it had ended already."""
        with self._session.begin() as session:
            row = session.get(BatchRow, batch_id, with_for_update=True)
            if row is None or row.status in TERMINAL:
                return False
            row.status, row.failed_at, row.errors = FAILED, _now(), [error]
            self._skip_queued(session, batch_id)
        return True

    # ---- sweeps -----------------------------------------------------------------------------------------
    def sweep_results(self) -> int:
        """Delete the per-item results of ended batches, and of batches that no longer exist (a runner
        that died after ending one, or a deleted tenant's, left them)."""
        prefixes = {key.split("/")[1] for key in self.blobs.keys("batches")}
        with self._session() as session:
            live = set(session.scalars(select(BatchRow.id).where(BatchRow.status.not_in(TERMINAL))))
        ended = sorted(prefixes - live)
        for batch_id in ended:
            self.blobs.delete(f"batches/{batch_id}")
        return len(ended)

    def sweep_orphan_files(self, older_than_s: float = ORPHAN_GRACE_S) -> int:
        """Delete the blobs under `files/` that no file row names (and leftover `.tmp`s), once older than
        `older_than_s`: what a process that died between a file's blob and its row left. The age keeps a
        blob whose row is being committed right now."""
        with self._session() as session:
            named = set(session.scalars(select(FileRow.blob)))
        return self.blobs.sweep("files", older_than_s, keep=named)

    def sweep_expired_files(self) -> int:
        """Delete batch output and error files past their expiry (rows first, then blobs)."""
        with self._session.begin() as session:
            rows = session.scalars(select(FileRow).where(FileRow.expires_at < _now())).all()
            for row in rows:
                session.delete(row)
        for row in rows:
            self.blobs.delete(row.blob)
        return len(rows)

    def purge_deleted_tenants(self, keep: Collection[str] = ("default",)) -> list[str]:
        """Delete the files and batches (with their items) of every tenant that is no longer in the tenants'
        table (it was deleted) and not in `keep` (the config's keys' tenant has no row): rows first, then
        blobs. The runner's work on their lines finds no row and is dropped. The tenants purged."""
        tenants = select(column("uid")).select_from(table("tenants"))  # serve/tenancy/store.py's ids
        owned = (
            select(BatchRow.tenant_id).where(BatchRow.tenant_id.not_in(tenants), BatchRow.tenant_id.not_in(keep))
            .union(select(FileRow.tenant_id).where(FileRow.tenant_id.not_in(tenants), FileRow.tenant_id.not_in(keep),
                                                   FileRow.tenant_id != ""))
        )  # fmt: skip
        with self._session() as session:
            gone = sorted(session.scalars(owned))
        if not gone:
            return []
        with self._session.begin() as session:
            batch_ids = list(session.scalars(select(BatchRow.id).where(BatchRow.tenant_id.in_(gone))))
            blobs = list(session.scalars(select(FileRow.blob).where(FileRow.tenant_id.in_(gone))))
            session.execute(delete(ItemRow).where(ItemRow.batch_id.in_(batch_ids)))
            session.execute(delete(BatchRow).where(BatchRow.id.in_(batch_ids)))
            session.execute(delete(FileRow).where(FileRow.tenant_id.in_(gone)))
        for key in blobs + [f"batches/{batch_id}" for batch_id in batch_ids]:
            self.blobs.delete(key)
        return gone

    @staticmethod
    def _skip_queued(session: Session, batch_id: str) -> None:
        session.execute(
            update(ItemRow).where(ItemRow.batch_id == batch_id, ItemRow.state == QUEUED).values(state=SKIPPED)
        )
