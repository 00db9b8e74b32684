"""The HTTP API (FastAPI), built in the ingress replica for its family and config.

Routes: POST /v1/images/generations, GET /v1/images/files/{name}, GET /v1/models[/{id}] behind one API-key
dependency; GET /healthz and GET /readyz open for probes; /openapi.json and /docs (FastAPI's own).

- Auth is checked before the body is read: the generation route declares no body parameter and reads
  the body itself, after the dependency, with a size limit (413 past `ingress.max_body_bytes`).
- Every failure reaches the client in OpenAI's error shape, and no traceback, actor id or address goes
  into any response (`failure` decides what a client is told).
- Every response, 500s included, is counted in `ifserve_requests_total` by route template and status.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from serve.config import ServeConfig
from serve.metrics import request_metrics
from serve.openai_api import (
    RETRY_AFTER_S,
    error_body,
    error_response,
    image_event,
    image_item,
    image_request_model,
    images_response,
    parse_image_request,
    png,
    retry_later,
)
from serve.orchestrator import Orchestrator, Overloaded, StageResult
from stages.errors import InvalidParameter, StageFailure
from stages.family import StageSpec
from stages.params import RequestParams

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


def failure(err: BaseException) -> ApiError:
    """What the client is told about a failed generation."""
    if isinstance(err, InvalidParameter):
        return ApiError(400, str(err), param=err.param)
    if isinstance(err, Overloaded):
        return ApiError(
            503, f"overloaded, retry later: {err}", kind="server_error", code="overloaded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )  # fmt: skip
    if isinstance(err, StageFailure):
        return ApiError(500, str(err), kind="server_error", code="stage_failed")
    log.error("generation failed", exc_info=err)
    return ApiError(500, "internal error", kind="server_error")


def build_http_app(
    config: ServeConfig, orchestrator: Orchestrator, ready: Callable[[], Awaitable[dict[str, int]]]
) -> FastAPI:
    """`ready()` gives the running replicas of every deployment of the graph."""
    family = config.family
    request_model = image_request_model(family.params)
    limits = family.checkpoint_limits(config.checkpoint_root())
    image_dir = Path(config.ingress.image_dir).expanduser().resolve()
    max_body = config.ingress.max_body_bytes
    model_id = config.model.id

    app = FastAPI(title="ifserve", summary=f"{family.name} on Ray Serve, OpenAI Images API compatible")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)

    @app.middleware("http")
    async def _record(request: Request, call_next):
        """Latency to the last byte (streams included) and status of every response, by route template."""
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as err:  # noqa: BLE001 - a bug in a route: still an OpenAI-shaped, counted 500
            log.error("%s %s failed", request.method, request.url.path, exc_info=err)
            response = error_response(500, "internal error", kind="server_error")
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")  # the template, never the raw path: bounded labels
        body = response.body_iterator if hasattr(response, "body_iterator") else None
        if body is None:
            request_metrics().observe(endpoint, response.status_code, time.perf_counter() - start)
            return response

        async def timed_body():
            try:
                async for chunk in body:
                    yield chunk
            finally:
                request_metrics().observe(endpoint, response.status_code, time.perf_counter() - start)

        response.body_iterator = timed_body()
        return response

    async def api_key(request: Request) -> None:
        if config.auth.api_key_sha256:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not config.auth.accepts(token.strip()):
                raise ApiError(401, "missing or invalid API key (Authorization: Bearer ...)", code="invalid_api_key")

    api = APIRouter(dependencies=[Depends(api_key)])

    # ---- probes (no key) ----------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready when every deployment of the graph has a running replica; otherwise names the missing."""
        replicas = await ready()
        missing = [name for name, count in replicas.items() if count < 1]
        if missing:
            return retry_later(f"not ready: no running replica of {', '.join(missing)}", "not_ready")
        return {"status": "ready", "replicas": replicas}

    # ---- models -------------------------------------------------------------------------------------
    card = {
        "id": model_id,
        "object": "model",
        "created": 0,
        "owned_by": "ifserve",
        "family": family.name,
        "sizes": [f"{s}x{s}" for s in family.sizes],
    }

    def check_model(model: str | None) -> None:
        if model is not None and model != model_id:
            raise ApiError(
                404, f"model: {model!r} is not served here; GET /v1/models lists the models",
                param="model", code="model_not_found",
            )  # fmt: skip

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card]}

    @api.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        check_model(model)
        return card

    # ---- images -------------------------------------------------------------------------------------
    async def read_body(request: Request) -> bytes:
        too_large = ApiError(413, f"body: larger than {max_body} bytes", param="body", code="body_too_large")
        if int(request.headers.get("content-length") or 0) > max_body:
            raise too_large
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise too_large
        return bytes(body)

    @api.post(
        "/v1/images/generations",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ImageGenerationRequest"}}},
            }
        },
    )
    async def generations(request: Request):
        try:
            body = parse_image_request(request_model, await read_body(request))
            check_model(body.model)
            images = body.generation_params()
            family.check_params(images[0], limits)
        except InvalidParameter as err:
            raise failure(err) from None
        request_id = uuid.uuid4().hex
        if body.stream:
            events = stream_events(orchestrator, request_id, images)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = await orchestrator.images(request_id, images)
        except Exception as err:  # noqa: BLE001 - every failure in OpenAI's shape
            raise failure(err) from None
        data = []
        for i, (params, result) in enumerate(zip(images, results, strict=True)):
            picture = await asyncio.to_thread(png, result.output.image)
            if body.response_format == "url":
                url = save_image(image_dir, f"{request_id}-{i}.png", picture, request)
                data.append(image_item(params.seed, result.timings(), url=url))
            else:
                data.append(image_item(params.seed, result.timings(), picture))
        return images_response(request_id, model_id, data)

    @api.get("/v1/images/files/{name}")
    async def image_file(name: str):
        path = image_dir / name
        if not re.fullmatch(r"[0-9a-f]{32}-\d+\.png", name) or not path.is_file():
            raise ApiError(404, f"name: no image {name!r}", param="name", code="not_found")
        return FileResponse(path, media_type="image/png")

    app.include_router(api)

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version="0.1.0", summary=app.summary, routes=app.routes)
            definitions = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions.pop("$defs", {}))
            components["ImageGenerationRequest"] = definitions
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


def save_image(image_dir: Path, name: str, picture: bytes, request: Request) -> str:
    image_dir.mkdir(parents=True, exist_ok=True)
    tmp = image_dir / f".{name}.tmp"
    tmp.write_bytes(picture)
    tmp.replace(image_dir / name)  # readers never see a half-written file
    return str(request.url_for("image_file", name=name))


async def stream_events(orchestrator: Orchestrator, request_id: str, images: list[RequestParams]) -> AsyncIterator[str]:
    """Server-sent events in the shape of OpenAI's image streaming: `image_generation.partial_image` for
    each finished stage before the last (with `stage`), then `image_generation.completed`, then `[DONE]`.
    A failure is sent as an `{"error": ...}` event and ends the stream; the other images are cancelled."""
    queue: asyncio.Queue = asyncio.Queue()

    async def one(index: int, params: RequestParams) -> None:
        partial = 0

        async def event(kind: str, result: StageResult, **extra) -> dict:
            picture = await asyncio.to_thread(png, result.output.image)
            return image_event(kind, index, params.seed, picture, result.output.image.shape[-1], **extra)

        async def on_stage(spec: StageSpec, result: StageResult) -> None:
            nonlocal partial
            await queue.put(await event("partial_image", result, stage=spec.name, partial_image_index=partial))
            partial += 1

        try:
            result = await orchestrator.image(f"{request_id}-{index}", params, on_stage)
            await queue.put(await event("completed", result, stages=result.timings()))
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - sent to the client as an error event
            error = failure(err)
            await queue.put(error_body(error.message, param=error.param, kind=error.kind, code=error.code))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(one(i, p)) for i, p in enumerate(images)]
    try:
        open_images = len(tasks)
        while open_images:
            item: dict[str, Any] | None = await queue.get()
            if item is None:
                open_images -= 1
                continue
            yield f"data: {json.dumps(item)}\n\n"
            if "error" in item:
                break
        yield "data: [DONE]\n\n"
    finally:  # the client went away, or an image failed: the others' tasks leave their batches
        for task in tasks:
            task.cancel()
