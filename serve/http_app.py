"""The HTTP API (FastAPI), built in the ingress replica for its config's models.

A request's `model` field picks the model (unset: the config's first); its model-specific fields are
then read with that model's request model.

Routes: POST /v1/images/generations, POST /v1/images/edits, GET /v1/models[/{id}], OpenAI's Files and
Batch API (serve/batch/routes.py) behind one API-key dependency; GET /v1/images/files/{owner}/{name}
(a `url` image: its signed link, or the owner's key); GET /healthz and GET /readyz open for probes;
/openapi.json and /docs (FastAPI's own).

- The API-key dependency finds the key's tenant (serve/tenancy/directory.py). An image request then
  asks the tenant's limits (serve/tenancy/limits.py, one count for every ingress replica, images
  counted by cost) before any work: past one, 429 with Retry-After; every answer carries OpenAI's
  `x-ratelimit-*` headers (serve/http_limits.py). The tenant's share (its id, priority class, weight)
  travels with each image through admission and every stage's queue. `url` images go to the shared blob
  store (serve/blob_store.py) behind signed links that expire; without a signature, another tenant's
  key gets 404.
- Auth is checked before the body is read: the image routes declare no body parameter and read the
  body themselves, after the dependency, with a size limit (413 past `ingress.max_body_bytes`, or
  `ingress.max_upload_bytes` for an edit's multipart upload) and a deadline (408 past
  `ingress.body_timeout_s`). An upload (an edit, a file) is admitted before its body is read (the
  tenant's rate, concurrency and uploads in flight) and spooled to disk as it arrives.
- A POST's body must say its media type (415 otherwise: application/json, or multipart/form-data for
  uploads), and an open service (no keys, loopback) refuses a browser's cross-site request (403), so no
  web page can post to it in its visitor's name.
- An edit's pictures are read and checked here (stages/pictures.py) before any stage sees them.
- Blocking work runs on thread pools by kind (serve/workers.py): the database's, the store's, PNG
  encoding's and Serve's controller's, so a stalled database or a flood of `/readyz` (answered from a
  reading at most a second old) never holds up an image. With the database away, the routes that need
  it answer 503 with Retry-After; images need it only for keys never yet read.
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
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

from serve.batch.routes import batch_routes
from serve.batch.store import BatchStore
from serve.config import ServeConfig
from serve.http_common import JSON, MULTIPART, ApiError, failure, read_body, requested_timeout, require_media
from serve.http_limits import Gate
from serve.http_uploads import Uploads, authenticate
from serve.metrics import request_metrics
from serve.openai_api import (
    AsciiJSONResponse,
    ImageRequestBase,
    check_text,
    error_body,
    error_response,
    final_png,
    image_event,
    json_object,
    requested_model,
    retry_later,
    safety_fields,
)
from serve.orchestrator import Orchestrator, StageResult, shared
from serve.served import IMAGE_ROUTE, ImageLinks, ServedModel, ServedModels, UnknownModel, generate
from serve.tenancy.directory import KeyDirectory
from serve.tenancy.limits import Decision
from serve.tenancy.store import Tenant
from serve.workers import DATABASE, PICTURES, STORE, run_on
from stages.errors import InvalidParameter
from stages.fair_share import DEFAULT_SHARE, Share
from stages.family import StageSpec
from stages.params import RequestParams
from stages.task import EditImages

log = logging.getLogger(__name__)
READY_CACHE_S = 1.0  # /readyz answers from a reading at most this old: a flood of probes asks Serve once a second


class Readiness:
    """`/readyz`'s answer, read at most once every READY_CACHE_S however many probes ask, all of them
    awaiting the same reading."""

    def __init__(self, ready: Callable[[], Awaitable[dict[str, int]]]):
        self.ready = ready
        self._reading: asyncio.Task | None = None
        self._read_at = -float("inf")

    async def replicas(self) -> dict[str, int]:
        stale = time.monotonic() - self._read_at > READY_CACHE_S
        if self._reading is None or (stale and self._reading.done()):
            self._reading = asyncio.get_running_loop().create_task(self.ready())
            self._read_at = time.monotonic()
        return await asyncio.shield(self._reading)


def build_http_app(
    config: ServeConfig,
    orchestrators: dict[str, Orchestrator],
    ready: Callable[[], Awaitable[dict[str, int]]],
    directory: KeyDirectory,
    gate: Gate,
    uploads: Uploads,
    links: ImageLinks,
    batches: BatchStore,
    wake_runner: Callable[[], Awaitable[None]],
) -> FastAPI:
    """`orchestrators`: each served model's, by model id; `ready()` gives the running replicas of every
    deployment of every model's graph; `directory` finds a key's tenant and `gate` asks its limits (the
    TenantLimits deployment); `uploads` admits and reads uploads; `links` keeps `url` images; `batches` and
    `wake_runner` serve the Batch API (serve/batch)."""
    served = ServedModels.of(config, orchestrators)
    ingress = config.ingress
    max_pixels, max_body = ingress.max_image_pixels, ingress.max_body_bytes
    body_timeout = ingress.body_timeout_s
    public_url = config.storage.public_url
    families = ", ".join(dict.fromkeys(m.family.name for m in served.values()))
    readiness = Readiness(ready)

    app = FastAPI(title="ifserve", summary=f"{families} on Ray Serve, OpenAI Images API compatible",
                  default_response_class=AsciiJSONResponse)  # fmt: skip

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(UnknownModel)
    async def _unknown_model(request: Request, exc: UnknownModel):
        return error_response(404, str(exc), param=exc.param, code="model_not_found")

    @app.exception_handler(InvalidParameter)
    async def _invalid(request: Request, exc: InvalidParameter):
        return failure(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError):
        """A query or path parameter FastAPI refused: OpenAI's shape, naming it (never echoing its value)."""
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(part) for part in first.get("loc", ())[1:]) or "request"
        return error_response(400, f"{param}: {first.get('msg', 'invalid')}", param=param)

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
        request.state.tenant = authenticate(directory, request.headers)

    async def text_parameters(request: Request) -> None:
        """Query and path parameters are text too: a NUL or a lone surrogate is a 400 naming it, not a
        database's error."""
        check_text({**dict(request.query_params.multi_items()), **request.path_params})

    api = APIRouter(dependencies=[Depends(text_parameters), Depends(api_key)])

    # ---- probes (no key) ----------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready when every deployment of the graph has a running replica; otherwise names the missing."""
        try:
            replicas = await readiness.replicas()
        except Exception:  # noqa: BLE001 - Serve's controller did not answer
            return retry_later("not ready: Serve's controller did not answer", "not_ready")
        missing = [name for name, count in replicas.items() if count < 1]
        if missing:
            return retry_later(f"not ready: no running replica of {', '.join(missing)}", "not_ready")
        return {"status": "ready", "replicas": replicas}

    # ---- models -------------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [m.card for m in served.values()]}

    @api.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        return served.named(model).card

    # ---- images -------------------------------------------------------------------------------------
    def one_file(files: dict, name: str, required: bool):
        found = files.pop(name, [])
        if len(found) > 1:
            raise InvalidParameter(name, f"one file, not {len(found)}")
        if required and not found:
            raise InvalidParameter(name, "is required: the picture to edit, as a file")
        return found[0].file if found else None

    async def answer(request: Request, target: ServedModel, body: ImageRequestBase, images: list[RequestParams],
                     edit, prefix: str, decision: Decision, share: Share, timeout_s: float | None):  # fmt: skip
        """Run an admitted request: its images (or its stream), then the lease back."""
        request_id = uuid.uuid4().hex
        tenant: Tenant = request.state.tenant
        deadline = target.orchestrator.deadline(timeout_s)
        if body.stream:
            events = stream_events(target.orchestrator, request_id, images, edit, prefix, share, deadline)
            return StreamingResponse(  # the lease back when the stream ends, or if it never starts
                released(events, decision.lease), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **decision.headers},
                background=BackgroundTask(gate.release, decision.lease),
            )  # fmt: skip

        async def publish(name: str, picture: bytes) -> str:
            base = public_url or str(request.base_url)
            return await run_on(STORE, links.save, tenant.id, name, picture, base)

        try:
            response = await generate(target, request_id, body, images, edit, share, publish, deadline)
        except Exception as err:  # noqa: BLE001 - every failure in OpenAI's shape, with the tenant's headers
            error = failure(err)
            error.headers = {**decision.headers, **(error.headers or {})}
            raise error from None
        finally:
            await gate.release(decision.lease)
        return AsciiJSONResponse(response, headers=decision.headers)

    async def released(events: AsyncIterator[str], lease: str | None) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:
            await gate.release(lease)

    def schema(names: list[str], media: str) -> dict:
        """The request body: the one model's schema, or one of the served models' (a request's `model`)."""
        refs = [{"$ref": f"#/components/schemas/{name}"} for name in names]
        body = refs[0] if len(refs) == 1 else {"anyOf": refs}
        return {"requestBody": {"required": True, "content": {media: {"schema": body}}}}

    generation_schemas = [m.request_model.__name__ for m in served.values()]
    edit_schemas = [model.__name__ for m in served.values() for model in m.edit_models.values()]

    @api.post("/v1/images/generations", openapi_extra=schema(generation_schemas, JSON))
    async def generations(request: Request):
        require_media(request, JSON)
        timeout_s = requested_timeout(request)
        try:
            target, body, images = served.generation(json_object(await read_body(request, max_body, body_timeout)))
        except UnknownModel:
            raise
        except InvalidParameter as err:
            raise failure(err) from None
        stages = target.orchestrator.deployments_for(images[0])
        decision, share = await gate.admit(request.state.tenant, target.id, len(images), target.units(images), stages)
        return await answer(request, target, body, images, None, "image_generation", decision, share, timeout_s)

    @api.post("/v1/images/edits", openapi_extra=schema(edit_schemas, MULTIPART) if edit_schemas else None)
    async def edits(request: Request):
        """OpenAI's image edit: `image` (and `mask`: inpainting) as files, the other fields as form fields.
        The tenant's request rate and concurrency are asked before the upload is read, its images after."""
        tenant: Tenant = request.state.tenant
        timeout_s = requested_timeout(request)
        try:
            async with uploads.form(request, max_part=max_body, max_files=4) as (form, decision):
                served.named(requested_model(form.fields))  # an unknown model is a 404 before the files are read
                image = one_file(form.files, "image", required=True)
                mask = one_file(form.files, "mask", required=False)
                if form.files:
                    raise InvalidParameter(sorted(form.files)[0], "is not a file this endpoint takes (image, mask)")
                target, body, images, edit = await run_on(PICTURES, served.edit, form.fields, image, mask, max_pixels)
                stages, units = target.orchestrator.deployments_for(images[0]), target.units(images)
        except UnknownModel:
            raise
        except Exception as err:  # noqa: BLE001 - whatever was wrong with the upload, in OpenAI's shape
            raise failure(err) from None
        decision, share = await gate.charge(decision, tenant, target.id, len(images), units, stages)
        return await answer(request, target, body, images, edit, "image_edit", decision, share, timeout_s)

    @app.get(IMAGE_ROUTE + "/{owner}/{name}", dependencies=[Depends(text_parameters)])
    async def image_file(owner: str, name: str, request: Request, expires: str | None = None,
                         signature: str | None = None):  # fmt: skip
        """A `url` image: open to anyone with its signed link until it expires; without a signature, to
        a key of the tenant that made it. Another tenant's key gets 404."""
        if not (re.fullmatch(r"[0-9a-f]{32}", owner) and re.fullmatch(r"[0-9a-zA-Z_.-]{1,128}\.png", name)):
            raise ApiError(404, "name: no such image", param="name", code="not_found")
        if expires is not None or signature is not None:
            try:
                # The first check may read the signing secret from the database: off the event loop.
                refused = await run_on(DATABASE, links.signer.check, request.url.path, expires, signature)
            except Exception as err:  # noqa: BLE001 - the signing secret is in a database that is away
                raise failure(err) from None
            if refused is not None:
                raise ApiError(403, f"signature: {refused} link; ask for the image again", param="signature",
                               code="invalid_signature")  # fmt: skip
        else:
            await api_key(request)
            if ImageLinks.owner(request.state.tenant.id) != owner:
                raise ApiError(404, f"name: no image {name!r}", param="name", code="not_found")
        try:
            picture = await run_on(STORE, links.blobs.read, links.key(owner, name))
        except FileNotFoundError:
            raise ApiError(404, f"name: no image {name!r} (expired images are deleted)", param="name",
                           code="not_found") from None  # fmt: skip
        # A browser keeps it no longer than its link lasts (the store's TTL when opened with a key).
        lasts = int(expires) - int(time.time()) if expires is not None else int(links.ttl_s(name))
        return Response(picture, media_type="image/png", headers={"Cache-Control": f"private, max-age={max(0, lasts)}"})

    api.include_router(batch_routes(config, batches, wake_runner, gate, uploads))
    app.include_router(api)

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version="0.1.0", summary=app.summary, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in [m for one in served.values() for m in (one.request_model, *one.edit_models.values())]:
                definitions = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(definitions.pop("$defs", {}))
                components[model.__name__] = definitions
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app


async def stream_events(
    orchestrator: Orchestrator,
    request_id: str,
    images: list[RequestParams],
    edit: EditImages | None = None,
    prefix: str = "image_generation",
    share: Share = DEFAULT_SHARE,
    deadline: float | None = None,
) -> AsyncIterator[str]:
    """Server-sent events in the shape of OpenAI's image streaming: `image_generation.partial_image` for
    each finished stage before the last (with `stage`), then `image_generation.completed`, then `[DONE]`
    (`image_edit.*` for edits). A failure is sent as an `{"error": ...}` event and ends the stream; the
    other images are cancelled."""
    queue: asyncio.Queue = asyncio.Queue()
    edit = shared(edit)

    async def one(index: int, params: RequestParams) -> None:
        partial = 0

        async def event(kind: str, result: StageResult, **extra) -> dict:
            picture = await run_on(PICTURES, final_png, result)
            size = result.output.image.shape[-1]
            return image_event(kind, index, params.seed, picture, size, prefix, **extra)

        async def on_stage(spec: StageSpec, result: StageResult) -> None:
            nonlocal partial
            await queue.put(await event("partial_image", result, stage=spec.name, partial_image_index=partial))
            partial += 1

        try:
            result = await orchestrator.image(f"{request_id}-{index}", params, on_stage, edit, share, deadline)
            await queue.put(await event("completed", result, stages=result.timings(), **safety_fields(result)))
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
