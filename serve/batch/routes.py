"""OpenAI's Files and Batch routes, so the official client's `files` and `batches` work unchanged:

    POST /v1/files (multipart: file, purpose=batch)   GET /v1/files   GET|DELETE /v1/files/{id}
    GET /v1/files/{id}/content
    POST /v1/batches {input_file_id, endpoint, completion_window, metadata}   GET /v1/batches (paged)
    GET /v1/batches/{id}   POST /v1/batches/{id}/cancel

They sit behind the API key like every route; a tenant sees only its own files and batches (anyone
else's answers 404). An upload is admitted before its body is read (the tenant's request rate,
concurrency and uploads in flight: serve/http_limits.py; its stored bytes against
`batch.max_tenant_bytes`), read within `ingress.body_timeout_s`, spooled to disk as it arrives and copied
into the store a chunk at a time; a download streams from the store the same way, or is sent from the
store's folder by Ray's proxy itself (serve/proxy_files.py). Creating a batch only
records it (`validating`) and wakes the runner (serve/batch/runner.py), which checks the input file and
runs it. The database's work runs on its own threads (serve/workers.py); with the database away, these
routes answer 503 with Retry-After.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask

from serve.batch.lines import unstorable_line
from serve.batch.store import BatchStore, Conflict, NotFound
from serve.blob_store import CHUNK
from serve.config import ServeConfig
from serve.http_common import JSON, ApiError, failure, read_body, require_media
from serve.http_limits import Gate
from serve.http_uploads import Uploads
from serve.openai_api import json_object
from serve.proxy_files import SENDFILE, SENDFILE_OK
from serve.workers import DATABASE, STORE, run_on
from stages.errors import InvalidParameter
from stages.params import invalid_parameter

# What a batch may call. An edit line's body is JSON: `image` (and `mask`) as base64 or data: URLs.
ENDPOINTS = ("/v1/images/generations", "/v1/images/edits")
PURPOSES = ("batch",)


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=48)
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16
    )


def batch_routes(
    config: ServeConfig, store: BatchStore, wake_runner: Callable[[], Awaitable[None]], gate: Gate, uploads: Uploads
) -> APIRouter:
    router = APIRouter()
    max_file, timeout_s = config.batch.max_file_bytes, config.ingress.body_timeout_s

    def tenant(request: Request) -> str:
        return request.state.tenant.id

    async def call(function, *args, pool=DATABASE):
        """A store call on its pool's threads, its errors in OpenAI's shape."""
        try:
            return await run_on(pool, function, *args)
        except NotFound as err:
            raise ApiError(404, str(err), param=err.param, code="not_found") from None
        except Conflict as err:
            raise ApiError(409, str(err), code="batch_not_cancellable") from None
        except Exception as err:  # noqa: BLE001 - a bad parameter (400), the database away (503), or a bug
            raise failure(err) from None

    # ---- files --------------------------------------------------------------------------------------
    @router.post("/v1/files")
    async def create_file(request: Request) -> dict:
        decision = None
        try:
            async with uploads.form(request, max_part=64 << 10, max_files=1) as (form, decision):
                purpose = form.fields.get("purpose")
                if purpose not in PURPOSES:
                    raise InvalidParameter("purpose", f"must be one of {', '.join(PURPOSES)}, not {purpose!r}")
                if len(form.files.get("file", [])) != 1:
                    raise InvalidParameter("file", "is required: one file, the batch's JSONL")
                (upload,) = form.files["file"]
                if upload.size is not None and upload.size > max_file:
                    raise ApiError(413, f"file: larger than {max_file} bytes (batch.max_file_bytes)", param="file",
                                   code="file_too_large")  # fmt: skip
                name = re.sub(r"[\x00-\x1f\x7f]", "_", upload.filename or "upload.jsonl") or "upload.jsonl"
                await upload.seek(0)
                bad = await run_on(STORE, unstorable_line, upload.file, config.batch_line_bytes())
                if bad is not None:  # refused now, rather than failing its batch later
                    raise InvalidParameter("file", bad)
                await upload.seek(0)
                stored = await call(store.store_file, tenant(request), name, purpose, upload.file, pool=STORE)
                row = await call(store.record_file, stored)
        except Exception as err:  # noqa: BLE001 - every refusal in OpenAI's shape (the lease is back already)
            raise failure(err) from None
        await gate.release(decision.lease)
        return row.openai()

    @router.get("/v1/files")
    async def list_files(request: Request, purpose: str | None = None) -> dict:
        rows = await call(store.files, tenant(request), purpose)
        return {"object": "list", "data": [row.openai() for row in rows], "has_more": False}

    @router.get("/v1/files/{file_id}")
    async def get_file(file_id: str, request: Request) -> dict:
        return (await call(store.file, tenant(request), file_id)).openai()

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str, request: Request):
        row = await call(store.file, tenant(request), file_id)
        local = store.blobs.local_path(row.blob)
        if local is not None and request.headers.get(SENDFILE_OK) and uploads.from_proxy(request):
            headers = {"Content-Length": str(row.bytes), SENDFILE: local}  # Ray's proxy sends it from the disk
            return Response(b"", media_type="application/jsonl", headers=headers)
        try:
            source = await run_on(STORE, store.blobs.reader, row.blob)
        except FileNotFoundError:  # deleted since its row was read
            raise ApiError(404, f"file_id: no file {file_id!r}", param="file_id", code="not_found") from None

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await run_on(STORE, source.read, CHUNK):
                yield chunk

        closed = BackgroundTask(run_on, STORE, source.close)  # also when the client left before the first chunk
        return StreamingResponse(chunks(), media_type="application/jsonl", headers={"Content-Length": str(row.bytes)},
                                 background=closed)  # fmt: skip

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str, request: Request) -> dict:
        await call(store.delete_file, tenant(request), file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- batches ------------------------------------------------------------------------------------
    async def with_counts(rows) -> list[dict]:
        counts = await call(store.counts, [row.id for row in rows])
        return [row.openai(counts[row.id]) for row in rows]

    @router.post("/v1/batches")
    async def create_batch(request: Request) -> dict:
        require_media(request, JSON)
        try:
            fields = json_object(await read_body(request, config.ingress.max_body_bytes, timeout_s))
            body = BatchCreate.model_validate(fields)
        except ValidationError as err:
            raise ApiError(400, str(invalid_parameter(err)), param=invalid_parameter(err).param) from None
        except InvalidParameter as err:
            raise ApiError(400, str(err), param=err.param) from None
        if body.endpoint not in ENDPOINTS:
            raise ApiError(400, f"endpoint: {body.endpoint!r} is not a batch endpoint here; one of "
                           f"{', '.join(ENDPOINTS)}", param="endpoint")  # fmt: skip
        row = await call(store.create_batch, tenant(request), body.input_file_id, body.endpoint,
                         body.completion_window, body.metadata)  # fmt: skip
        await wake_runner()
        return (await with_counts([row]))[0]

    @router.get("/v1/batches")
    async def list_batches(request: Request, limit: int = Query(20, ge=1, le=100), after: str | None = None) -> dict:
        rows, more = await call(store.batches, tenant(request), limit, after)
        data = await with_counts(rows)
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}  # fmt: skip

    @router.get("/v1/batches/{batch_id}")
    async def get_batch(batch_id: str, request: Request) -> dict:
        return (await with_counts([await call(store.batch, tenant(request), batch_id)]))[0]

    @router.post("/v1/batches/{batch_id}/cancel")
    async def cancel_batch(batch_id: str, request: Request) -> dict:
        require_media(request, JSON)  # no body, but a browser's form could not say so: no cross-site cancel
        row = await call(store.cancel, tenant(request), batch_id)
        await wake_runner()
        return (await with_counts([row]))[0]

    return router
