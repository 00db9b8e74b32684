"""The Batch API's rows (schema: serve/migrations/versions/0002_batches.py) and their OpenAI shapes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column

from serve.database import Base, UtcDateTime

# OpenAI's batch statuses; the terminal ones end a batch.
VALIDATING, IN_PROGRESS, FINALIZING = "validating", "in_progress", "finalizing"
COMPLETED, FAILED, EXPIRED = "completed", "failed", "expired"
CANCELLING, CANCELLED = "cancelling", "cancelled"
TERMINAL = (COMPLETED, FAILED, EXPIRED, CANCELLED)
EVENTS = ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled")

# An item's states: waiting, claimed by a runner (with a lease), or finished one way or another: its
# result written, skipped (its batch stopped first), or abandoned (runners died running it, every try).
QUEUED, RUNNING, SUCCEEDED, ERRORED = "queued", "running", "succeeded", "errored"
SKIPPED, ABANDONED = "skipped", "abandoned"
DONE = (SUCCEEDED, ERRORED, SKIPPED, ABANDONED)
WITHOUT_RESULT = (SKIPPED, ABANDONED)  # done, with an error line made at the end instead of a result


def _epoch(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp())


class FileRow(Base):
    __tablename__ = "batch_files"

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    tenant_id: Mapped[str] = mapped_column("tenant", String(64), index=True)  # Tenant.id, never its name
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    blob: Mapped[str] = mapped_column(String(255))  # its key in the blob store
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime)  # a batch's output: deleted after this

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "file", "bytes": self.bytes, "created_at": _epoch(self.created_at),
            "expires_at": _epoch(self.expires_at), "filename": self.filename, "purpose": self.purpose,
            "status": "processed", "status_details": None,
        }  # fmt: skip


class BatchRow(Base):
    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    tenant_id: Mapped[str] = mapped_column("tenant", String(64), index=True)
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(48))
    completion_window: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), index=True)
    metadata_: Mapped[dict | None] = mapped_column("metadata", JSON)
    errors: Mapped[list | None] = mapped_column(JSON)  # validation errors: [{code, message, line, param}]
    output_file_id: Mapped[str | None] = mapped_column(String(48))
    error_file_id: Mapped[str | None] = mapped_column(String(48))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    in_progress_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    finalizing_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    failed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    expired_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cancelling_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    def openai(self, counts: dict[str, int]) -> dict[str, Any]:
        """OpenAI's Batch object; `counts`: total, completed, failed."""
        errors = {"object": "list", "data": self.errors} if self.errors else None
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint, "errors": errors,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": _epoch(self.created_at), "expires_at": _epoch(self.expires_at),
            **{f"{event}_at": _epoch(getattr(self, f"{event}_at")) for event in EVENTS},
            "request_counts": counts, "metadata": self.metadata_,
        }  # fmt: skip


class ItemRow(Base):
    __tablename__ = "batch_items"

    id: Mapped[int] = mapped_column(primary_key=True)
    batch_id: Mapped[str] = mapped_column(String(48), ForeignKey("batches.id", ondelete="CASCADE"))
    line: Mapped[int]  # 1-based line of the input file
    custom_id: Mapped[str] = mapped_column(String(512))
    tenant_id: Mapped[str] = mapped_column("tenant", String(64))
    body: Mapped[dict] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16))
    lease_owner: Mapped[str | None] = mapped_column(String(48))
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime)
    attempts: Mapped[int]
    status_code: Mapped[int | None]
