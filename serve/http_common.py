"""What every route module shares: errors in OpenAI's shape raised from anywhere in a route, the media
types a route takes, and request bodies read after the API key was checked, within a size limit (413
past it) and a deadline (408 past it), multipart uploads spooled to disk rather than held in memory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.types import Message

from serve.batch.store import QuotaExceeded
from serve.database import UNAVAILABLE
from serve.openai_api import RETRY_AFTER_S, check_text, error_response
from serve.orchestrator import Overloaded, Unavailable
from serve.tenancy.directory import KeysUnavailable
from serve.workers import STORE, run_on
from stages.errors import DeadlineExceeded, InvalidParameter, StageFailure

log = logging.getLogger(__name__)

JSON = "application/json"
MULTIPART = "multipart/form-data"


class ApiError(Exception):
    """An error response in OpenAI's shape, raised from anywhere in a route or dependency."""

    def __init__(self, status: int, message: str, *, param=None, kind="invalid_request_error", code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(
            self.status, self.message, param=self.param, kind=self.kind, code=self.code, headers=self.headers
        )


def require_media(request: Request, media: str) -> None:
    """415 unless the request says its body is `media`. A browser can send a cross-site POST without asking
    first only as text/plain, a urlencoded or a multipart form: a JSON route never takes those."""
    given = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if given != media:
        raise ApiError(415, f"Content-Type: must be {media}, not {given or 'missing'!r}", param="Content-Type",
                       code="unsupported_media_type")  # fmt: skip


def guarded(request: Request, limit: int, timeout_s: float) -> Request:
    """The request, reading its body at most `limit` bytes (413) within `timeout_s` (408), so no client
    can make the ingress hold a large body or wait for a slow one."""
    too_large = ApiError(413, f"body: larger than {limit} bytes", param="body", code="body_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    loop = asyncio.get_running_loop()
    deadline, received, receive = loop.time() + timeout_s, 0, request.receive

    async def limited() -> Message:
        nonlocal received
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            raise ApiError(408, f"body: not received within {timeout_s:g} s (ingress.body_timeout_s)",
                           param="body", code="body_timeout") from None  # fmt: skip
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise too_large
        return message

    return Request(request.scope, limited)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    return await guarded(request, limit, timeout_s).body()


@dataclass
class Form:
    """A multipart form: its fields, and its files by name (`name[]` as `name`), each an UploadFile that
    Starlette spooled to disk past 1 MiB."""

    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, list[UploadFile]] = field(default_factory=dict)


@asynccontextmanager
async def multipart(request: Request, limit: int, timeout_s: float, max_part: int, max_files: int,
                    spooled: BinaryIO | None = None) -> AsyncIterator[Form]:  # fmt: skip
    """The form, `limit` bytes in all, read as it arrives (or from `spooled`, the body the proxy wrote to
    disk: serve/proxy_files.py); its files are deleted when the block ends."""
    if not request.headers.get("content-type", "").lower().startswith(MULTIPART):
        raise ApiError(415, f"Content-Type: must be {MULTIPART}", param="Content-Type", code="unsupported_media_type")
    try:
        if spooled is None:
            parsed = await guarded(request, limit, timeout_s).form(max_files=max_files, max_fields=128,
                                                                    max_part_size=max_part)  # fmt: skip
        else:
            parser = MultiPartParser(request.headers, _chunks(spooled), max_files=max_files, max_fields=128,
                                     max_part_size=max_part)  # fmt: skip
            parsed = await parser.parse()
    except MultiPartException as err:
        raise InvalidParameter("body", f"not a valid multipart form: {err.message}") from None
    try:
        form = Form()
        for name, value in parsed.multi_items():
            if isinstance(value, UploadFile):
                form.files.setdefault(name.removesuffix("[]"), []).append(value)
            else:
                form.fields[name] = value
        check_text(form.fields)
        yield form
    finally:
        await parsed.close()


async def _chunks(source: BinaryIO, size: int = 1 << 20) -> AsyncIterator[bytes]:
    while chunk := await run_on(STORE, source.read, size):
        yield chunk


def failure(err: BaseException) -> ApiError:
    """What the client is told about a failed request."""
    if isinstance(err, ApiError):
        return err
    if isinstance(err, InvalidParameter):
        return ApiError(400, str(err), param=err.param)
    if isinstance(err, QuotaExceeded):
        return ApiError(413, str(err), param="file", code="storage_quota_exceeded")
    if isinstance(err, Overloaded):
        return ApiError(
            503, f"overloaded, retry later: {err}", kind="server_error", code="overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )  # fmt: skip
    if isinstance(err, Unavailable):
        return ApiError(
            503, f"unavailable, retry later: {err}", kind="server_error", code="unavailable",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )  # fmt: skip
    if isinstance(err, (*UNAVAILABLE, KeysUnavailable)):
        log.warning("the database is unavailable: %s", str(err).splitlines()[0] if str(err) else type(err).__name__)
        return ApiError(503, "the service's database is unavailable; retry later", kind="server_error",
                        code="database_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    if isinstance(err, DeadlineExceeded):
        return ApiError(504, f"the request's deadline passed ({err.stage})", kind="timeout", code="deadline_exceeded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    if isinstance(err, StageFailure):
        return ApiError(500, str(err), kind="server_error", code="stage_failed")
    log.error("request failed", exc_info=err)
    return ApiError(500, "internal error", kind="server_error")


TIMEOUT_HEADER = "X-Request-Timeout"  # seconds: a request's own deadline, when shorter than faults.timeout_s


def requested_timeout(request: Request) -> float | None:
    """The request's `X-Request-Timeout`, if it sent one (400 if it is not a positive number)."""
    value = request.headers.get(TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ApiError(400, f"{TIMEOUT_HEADER}: must be a positive number of seconds, not {value!r}",
                       param=TIMEOUT_HEADER)  # fmt: skip
    return seconds
