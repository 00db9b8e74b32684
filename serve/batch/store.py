"""The Batch API's state: files, batches and items in the SQL database, their blobs in the fsspec store.

Every change is one transaction. Blobs are written before the rows that name them, at keys fixed by
their ids, and rows are deleted before their blobs, so a process that dies between the two never leaves
a row without its blob. What it can leave is a blob without a row: a batch's results and output files
are rewritten by the next runner at the same keys, and `sweep_orphan_files` deletes an uploaded file's
blob that no row names.

Items are claimed with a lease: `SELECT ... FOR UPDATE SKIP LOCKED` on PostgreSQL (two runners never
take the same row and never wait for each other), `BEGIN IMMEDIATE` on SQLite (serve/database.py). A
runner renews its leases while it works; a dead runner's items are claimed again once theirs run out.
An item's result is written (write-then-rename) by the lease's holder while its row is locked, then the
item is marked done in the same transaction, so each input line ends with exactly one result, whichever
runner finished it. Items of a stopping batch (cancelled, or past its window) that are handed back, or
whose runner died, are skipped rather than queued, so the batch always ends.
"""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from serve.batch.tables import (
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
    BatchRow,
    FileRow,
    ItemRow,
)
from serve.blob_store import BlobStore
from stages.errors import InvalidParameter

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
ORPHAN_GRACE_S = 3600.0  # a blob without a row is deleted only when older; far beyond a blob-then-row write


class NotFound(Exception):
    """No such file or batch for this tenant (another tenant's answers the same)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class Conflict(Exception):
    """The batch is not in a state that allows this (e.g. cancelling a completed batch)."""


@dataclass(frozen=True)
class Claimed:
    """An item a runner holds: what it needs to run it and to write its result."""

    id: int
    batch_id: str
    endpoint: str
    line: int
    custom_id: str
    tenant: str
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


def jsonl(lines: list[dict]) -> bytes:
    return b"".join(json.dumps(line, separators=(",", ":")).encode() + b"\n" for line in lines)


class BatchStore:
    def __init__(self, engine: Engine, blobs: BlobStore):
        self.engine, self.blobs = engine, blobs
        self._session = sessionmaker(engine, expire_on_commit=False)
        self._skip_locked = engine.dialect.name == "postgresql"

    # ---- files ------------------------------------------------------------------------------------------
    def create_file(self, tenant: str, filename: str, purpose: str, data: bytes) -> FileRow:
        row = FileRow(id=new_id("file-"), tenant=tenant, filename=filename[:255], purpose=purpose, bytes=len(data),
                      created_at=_now())  # fmt: skip
        row.blob = file_key(row.id)
        self.blobs.write(row.blob, data)
        try:
            with self._session.begin() as session:
                session.add(row)
        except Exception:
            self.blobs.delete(row.blob)
            raise
        return row

    def file(self, tenant: str, file_id: str) -> FileRow:
        with self._session() as session:
            row = session.get(FileRow, file_id)
        if row is None or row.tenant != tenant:
            raise NotFound("file_id", f"no file {file_id!r}")
        return row

    def files(self, tenant: str, purpose: str | None = None) -> list[FileRow]:
        query = select(FileRow).where(FileRow.tenant == tenant).order_by(FileRow.created_at.desc(), FileRow.id)
        if purpose is not None:
            query = query.where(FileRow.purpose == purpose)
        with self._session() as session:
            return list(session.scalars(query))

    def content(self, tenant: str, file_id: str) -> bytes:
        return self.blobs.read(self.file(tenant, file_id).blob)

    def delete_file(self, tenant: str, file_id: str) -> None:
        with self._session.begin() as session:
            row = session.get(FileRow, file_id)
            if row is None or row.tenant != tenant:
                raise NotFound("file_id", f"no file {file_id!r}")
            session.delete(row)
        self.blobs.delete(row.blob)

    # ---- batches ----------------------------------------------------------------------------------------
    def create_batch(
        self, tenant: str, input_file_id: str, endpoint: str, completion_window: str, metadata: dict | None
    ) -> BatchRow:
        if completion_window not in COMPLETION_WINDOWS:
            raise InvalidParameter("completion_window", f"must be one of {', '.join(COMPLETION_WINDOWS)}")
        try:
            source = self.file(tenant, input_file_id)
        except NotFound:
            raise NotFound("input_file_id", f"no file {input_file_id!r}") from None
        if source.purpose != "batch":
            raise InvalidParameter("input_file_id", f"file {input_file_id!r} has purpose {source.purpose!r}, not batch")
        now = _now()
        row = BatchRow(id=new_id("batch_"), tenant=tenant, endpoint=endpoint, input_file_id=input_file_id,
                       completion_window=completion_window, status=VALIDATING, metadata_=metadata, created_at=now,
                       expires_at=now + COMPLETION_WINDOWS[completion_window])  # fmt: skip
        with self._session.begin() as session:
            session.add(row)
        return row

    def batch(self, tenant: str | None, batch_id: str) -> BatchRow:
        """The batch (`tenant` None: whoever owns it, for the runner)."""
        with self._session() as session:
            row = session.get(BatchRow, batch_id)
        if row is None or (tenant is not None and row.tenant != tenant):
            raise NotFound("batch_id", f"no batch {batch_id!r}")
        return row

    def batches(self, tenant: str, limit: int = 20, after: str | None = None) -> tuple[list[BatchRow], bool]:
        """The tenant's batches, newest first, after the one named; and whether there are more."""
        query = select(BatchRow).where(BatchRow.tenant == tenant)
        with self._session() as session:
            if after is not None:
                cursor = session.get(BatchRow, after)
                if cursor is None or cursor.tenant != tenant:
                    raise NotFound("after", f"no batch {after!r}")
                query = query.where(
                    or_(BatchRow.created_at < cursor.created_at,
                        (BatchRow.created_at == cursor.created_at) & (BatchRow.id > cursor.id))
                )  # fmt: skip
            rows = list(session.scalars(query.order_by(BatchRow.created_at.desc(), BatchRow.id).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def counts(self, batch_ids: list[str]) -> dict[str, dict[str, int]]:
        """OpenAI's request_counts of each batch: total, completed, failed (skipped items count as failed:
        they are in the error file)."""
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
            batch_id: {"total": sum(c.values()), "completed": c[SUCCEEDED], "failed": c[ERRORED] + c[SKIPPED]}
            for batch_id, c in tally.items()
        }

    def cancel(self, tenant: str, batch_id: str) -> BatchRow:
        """Stop a batch: items not yet claimed never run; the runner finishes the others and then writes
        what was done (`cancelling`, then `cancelled`)."""
        with self._session.begin() as session:
            row = session.get(BatchRow, batch_id)
            if row is None or row.tenant != tenant:
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

    def start(self, batch_id: str, items: list[tuple[int, str, dict]]) -> bool:
        """A validated batch's items (line, custom_id, body), queued; False if it was cancelled meanwhile."""
        with self._session.begin() as session:
            row = session.get(BatchRow, batch_id, with_for_update=True)
            if row is None or row.status != VALIDATING:
                return False
            session.add_all(
                ItemRow(
                    batch_id=batch_id,
                    line=line,
                    custom_id=custom_id,
                    tenant=row.tenant,
                    body=body,
                    state=QUEUED,
                    attempts=0,
                )  # fmt: skip
                for line, custom_id, body in items
            )
            row.status, row.in_progress_at = IN_PROGRESS, _now()
        return True

    def fail(self, batch_id: str, errors: list[dict], error_lines: list[dict]) -> None:
        """A batch that failed validation: its errors, and an error file naming the lines."""
        error_file = FileRow(id=f"file-{batch_id}-errors", tenant="", filename=f"{batch_id}_error.jsonl",
                             purpose="batch_output", bytes=0, created_at=_now())  # fmt: skip
        data = jsonl(error_lines)
        error_file.blob, error_file.bytes = file_key(error_file.id), len(data)
        self.blobs.write(error_file.blob, data)
        with self._session.begin() as session:
            row = session.get(BatchRow, batch_id, with_for_update=True)
            if row is None or row.status not in (VALIDATING, CANCELLING):
                return
            error_file.tenant = row.tenant
            session.merge(error_file)
            row.status, row.failed_at, row.errors, row.error_file_id = FAILED, _now(), errors, error_file.id

    def claim(self, owner: str, limit: int, lease_s: float, room: dict[str, int], per_tenant: int) -> list[Claimed]:
        """Up to `limit` items of running batches, never more of a tenant than its `room` (unlisted:
        `per_tenant`): tenants in order of their oldest waiting item, each tenant's oldest first. Items
        whose lease ran out (their runner died) are taken again."""
        now = _now()
        claimable = (
            select(ItemRow)
            .join(BatchRow, BatchRow.id == ItemRow.batch_id)
            .where(BatchRow.status == IN_PROGRESS, BatchRow.expired_at.is_(None))
            .where(or_(ItemRow.state == QUEUED, (ItemRow.state == RUNNING) & (ItemRow.lease_until < now)))
        )
        taken: list[Claimed] = []
        with self._session.begin() as session:
            waiting = select(ItemRow.tenant, func.min(ItemRow.id).label("oldest")).where(
                ItemRow.id.in_(claimable.with_only_columns(ItemRow.id))
            )
            tenants = [name for name, _ in session.execute(waiting.group_by(ItemRow.tenant).order_by("oldest"))]
            for tenant in tenants:
                want = min(room.get(tenant, per_tenant), limit - len(taken))
                if want <= 0:
                    continue
                # Lock only what is taken: rows locked and left would be skipped by the other runners.
                query = claimable.where(ItemRow.tenant == tenant).order_by(ItemRow.id).limit(want)
                if self._skip_locked:
                    query = query.with_for_update(skip_locked=True, of=ItemRow)
                for item, endpoint in session.execute(query.add_columns(BatchRow.endpoint)):
                    item.state, item.lease_owner, item.lease_until = RUNNING, owner, now + timedelta(seconds=lease_s)
                    item.attempts += 1
                    taken.append(Claimed(item.id, item.batch_id, endpoint, item.line, item.custom_id, item.tenant,
                                         item.body, item.attempts))  # fmt: skip
        return taken

    def renew(self, owner: str, lease_s: float) -> int:
        """Extend every lease `owner` still holds (one run out but not yet taken by another too); how many."""
        with self._session.begin() as session:
            result = session.execute(
                update(ItemRow)
                .where(ItemRow.lease_owner == owner, ItemRow.state == RUNNING)
                .values(lease_until=_now() + timedelta(seconds=lease_s))
            )
            return result.rowcount

    def finish(self, item: Claimed, owner: str, line: dict, status_code: int | None) -> bool:
        """Write the item's result line and mark it done, if `owner` still holds it (False otherwise: its
        lease ran out and another runner took it, whose result stands). The row stays locked from the check
        to the commit, so no other runner can take it in between and no stale result overwrites one."""
        state = SUCCEEDED if status_code == 200 else ERRORED
        with self._session.begin() as session:
            held = session.scalar(
                select(ItemRow)
                .where(ItemRow.id == item.id, ItemRow.lease_owner == owner, ItemRow.state == RUNNING)
                .with_for_update()
            )
            if held is None:
                return False
            self.blobs.write(result_key(item.batch_id, item.line), jsonl([line]))
            held.state, held.status_code, held.lease_owner, held.lease_until = state, status_code, None, None
        return True

    def release(self, owner: str) -> int:
        """Hand `owner`'s unfinished items back (a runner shutting down), so others take them at once."""
        with self._session.begin() as session:
            return self._hand_back(session, (ItemRow.lease_owner == owner) & (ItemRow.state == RUNNING))

    def release_item(self, item: Claimed, owner: str) -> None:
        """Hand one item back to the queue (its stage shed it or failed: tried again later)."""
        with self._session.begin() as session:
            self._hand_back(
                session, (ItemRow.id == item.id) & (ItemRow.lease_owner == owner) & (ItemRow.state == RUNNING)
            )

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

    def finalize(self, batch_id: str, skipped_error: dict[str, str]) -> str | None:
        """Write the output and error files of a batch whose items are all done, and end it: completed,
        cancelled or expired. Returns the new status (None: not ready, or already ended)."""
        row = self.batch(None, batch_id)
        if row.status in TERMINAL or self.unfinished(batch_id):
            return None
        with self._session.begin() as session:
            current = session.get(BatchRow, batch_id, with_for_update=True)
            if current.status == IN_PROGRESS:
                current.status = FINALIZING
            current.finalizing_at = _now()
        with self._session() as session:
            items = list(session.scalars(select(ItemRow).where(ItemRow.batch_id == batch_id).order_by(ItemRow.line)))
        outputs, errors = [], []
        for item in items:
            if item.state == SKIPPED:
                errors.append({"id": f"batch_req_{item.id}", "custom_id": item.custom_id, "response": None,
                               "error": skipped_error})  # fmt: skip
                continue
            line = json.loads(self.blobs.read(result_key(batch_id, item.line)))
            (outputs if item.state == SUCCEEDED else errors).append(line)
        files = []
        for kind, lines in (("output", outputs), ("error", errors)):
            if lines:
                data = jsonl(lines)
                file = FileRow(id=f"file-{batch_id}-{kind}", tenant=row.tenant, filename=f"{batch_id}_{kind}.jsonl",
                               purpose="batch_output", bytes=len(data), created_at=_now())  # fmt: skip
                file.blob = file_key(file.id)
                self.blobs.write(file.blob, data)
                files.append(file)
        ended = CANCELLED if row.status == CANCELLING else EXPIRED if row.expired_at else COMPLETED
        with self._session.begin() as session:
            current = session.get(BatchRow, batch_id, with_for_update=True)
            if current.status in TERMINAL:
                return None
            for file in files:
                session.merge(file)
            current.output_file_id = next((f.id for f in files if f.id.endswith("-output")), None)
            current.error_file_id = next((f.id for f in files if f.id.endswith("-error")), None)
            current.status = ended
            setattr(current, f"{ended}_at", current.expired_at if ended == EXPIRED else _now())
        self.blobs.delete(f"batches/{batch_id}")  # the per-item results now live in the files
        return ended

    def sweep_results(self) -> int:
        """Delete the per-item results of ended batches (a runner that died after ending one left them)."""
        prefixes = {key.split("/")[1] for key in self.blobs.keys("batches")}
        ended = [row.id for row in self.with_status(*TERMINAL) if row.id in prefixes]
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

    @staticmethod
    def _skip_queued(session: Session, batch_id: str) -> None:
        session.execute(
            update(ItemRow).where(ItemRow.batch_id == batch_id, ItemRow.state == QUEUED).values(state=SKIPPED)
        )
