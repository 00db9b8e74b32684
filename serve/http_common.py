"""What every route module shares: errors in OpenAI's shape raised from anywhere in a route, and request
bodies read within a size limit (413 past it) after the API key was checked."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from serve.openai_api import RETRY_AFTER_S, error_response
from serve.orchestrator import Overloaded, Unavailable
from stages.errors import DeadlineExceeded, InvalidParameter, StageFailure

log = logging.getLogger(__name__)


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


async def read_body(request: Request, limit: int) -> bytes:
    too_large = ApiError(413, f"body: larger than {limit} bytes", param="body", code="body_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def read_multipart(
    request: Request, limit: int, max_part: int, max_files: int
) -> tuple[dict[str, str], dict[str, list[bytes]], dict[str, str]]:
    """A multipart form's fields, files (by name, `name[]` as `name`) and the files' names, `limit` bytes
    in all."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidParameter("body", "must be multipart/form-data")
    request._body = await read_body(request, limit)  # Starlette's form() parses the cached body
    try:
        form = await request.form(max_files=max_files, max_fields=128, max_part_size=max_part)
    except MultiPartException as err:
        raise InvalidParameter("body", f"not a valid multipart form: {err.message}") from None
    fields: dict[str, str] = {}
    files: dict[str, list[bytes]] = {}
    filenames: dict[str, str] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            files.setdefault(name.removesuffix("[]"), []).append(await value.read())
            filenames.setdefault(name.removesuffix("[]"), value.filename or "")
        else:
            fields[name] = value
    await form.close()
    return fields, files, filenames


def failure(err: BaseException) -> ApiError:
    """What the client is told about a failed generation."""
    if isinstance(err, InvalidParameter):
        return ApiError(400, str(err), param=err.param)
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
    if isinstance(err, DeadlineExceeded):
        return ApiError(504, f"the request's deadline passed ({err.stage})", kind="timeout", code="deadline_exceeded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
    if isinstance(err, StageFailure):
        return ApiError(500, str(err), kind="server_error", code="stage_failed")
    log.error("generation failed", exc_info=err)
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
