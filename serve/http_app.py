"""The HTTP API (FastAPI), built in the ingress replica for its config's models.

A request's `model` field picks the model (unset: the config's first); its model-specific fields are
then read with that model's request model.

Routes: POST /v1/images/generations, POST /v1/images/edits, GET /v1/models[/{id}], OpenAI's Files and
Batch API (serve/batch/routes.py) behind one API-key dependency; GET /v1/images/files/{owner}/{name}
(a `url` image: its signed link, or the owner's key); GET /healthz and GET /readyz open for probes;
/openapi.json and /docs (FastAPI's own).

- The API-key dependency finds the key's tenant (serve/tenancy/directory.py). An image request then
  asks the tenant's limits (serve/tenancy/limits.py, one count for every ingress replica) before any
  work: past one, 429 with Retry-After; every answer carries OpenAI's `x-ratelimit-*` headers. The
  tenant's share (name, priority class, weight) travels with each image through admission and every
  stage's queue. `url` images go to the shared blob store (serve/blob_store.py) behind signed links
  that expire; without a signature, another tenant's key gets 404.

- Auth is checked before the body is read: the image routes declare no body parameter and read the
  body themselves, after the dependency, with a size limit (413 past `ingress.max_body_bytes`, or
  `ingress.max_upload_bytes` for an edit's multipart upload).
- An edit's pictures are read and checked here (stages/pictures.py) before any stage sees them.
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
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from serve.batch.routes import batch_routes
from serve.batch.store import BatchStore
from serve.config import ServeConfig
from serve.http_common import ApiError, failure, read_body, read_multipart, requested_timeout
from serve.metrics import request_metrics, tenant_metrics
from serve.openai_api import (
    ImageRequestBase,
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
from stages.errors import InvalidParameter
from stages.fair_share import DEFAULT_SHARE, Share
from stages.family import StageSpec
from stages.params import RequestParams
from stages.task import EditImages

log = logging.getLogger(__name__)


def build_http_app(
    config: ServeConfig,
    orchestrators: dict[str, Orchestrator],
    ready: Callable[[], Awaitable[dict[str, int]]],
    directory: KeyDirectory,
    limits: DeploymentHandle,
    links: ImageLinks,
    batches: BatchStore,
    wake_runner: Callable[[], Awaitable[None]],
) -> FastAPI:
    """`orchestrators`: each served model's, by model id; `ready()` gives the running replicas of every
    deployment of every model's graph; `directory` finds a key's tenant and `limits` (the TenantLimits
    deployment) counts its requests; `links` keeps `url` images; `batches` and `wake_runner` serve the
    Batch API (serve/batch)."""
    served = ServedModels.of(config, orchestrators)
    max_upload = config.ingress.max_upload_bytes
    max_pixels = config.ingress.max_image_pixels
    max_body = config.ingress.max_body_bytes
    public_url = config.storage.public_url
    families = ", ".join(dict.fromkeys(m.family.name for m in served.values()))

    app = FastAPI(title="ifserve", summary=f"{families} on Ray Serve, OpenAI Images API compatible")

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(UnknownModel)
    async def _unknown_model(request: Request, exc: UnknownModel):
        return error_response(404, str(exc), param=exc.param, code="model_not_found")

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
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        tenant = directory.authenticate(token.strip() if scheme.lower() == "bearer" else None)
        if tenant is None:
            raise ApiError(
                401, "missing, invalid or revoked API key (Authorization: Bearer ...)", code="invalid_api_key"
            )
        request.state.tenant = tenant

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
    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [m.card for m in served.values()]}

    @api.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        return served.named(model).card

    # ---- images -------------------------------------------------------------------------------------
    async def read_form(request: Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
        """The multipart form's fields and files (by name, `image[]` as `image`), within the upload limit."""
        fields, files, _ = await read_multipart(request, max_upload, max_part=max_body, max_files=4)
        return fields, files

    def one_file(files: dict[str, list[bytes]], name: str, required: bool) -> bytes | None:
        found = files.pop(name, [])
        if len(found) > 1:
            raise InvalidParameter(name, f"one file, not {len(found)}")
        if required and not found:
            raise InvalidParameter(name, "is required: the picture to edit, as a file")
        return found[0] if found else None

    async def admit(tenant: Tenant, model: str, images: int, stages: list[str]) -> tuple[Decision, Share]:
        """The tenant's limits and room in every stage it needs, before any work: 429 past a limit, 503 when
        a stage is full or the service is draining."""
        if tenant.ipm is not None and images > tenant.ipm:
            raise failure(InvalidParameter("n", f"{images} images exceed this key's limit of {tenant.ipm} a minute"))
        decision: Decision = await limits.acquire.remote(tenant, images, stages)
        share = Share(tenant.name, tenant.priority, tenant.weight, decision.label)
        if not decision.allowed:
            tenant_metrics().refused(share, decision.limit)
            if decision.limit in ("overloaded", "draining"):
                raise ApiError(503, decision.message, kind="server_error", code=decision.limit,
                               headers=decision.headers)  # fmt: skip
            raise ApiError(
                429, decision.message, kind=decision.limit, code="rate_limit_exceeded", headers=decision.headers
            )
        tenant_metrics().requested(model, share, images)
        return decision, share

    async def answer(
        request: Request, target: ServedModel, body: ImageRequestBase, images: list[RequestParams], edit, prefix: str
    ):
        request_id = uuid.uuid4().hex
        tenant: Tenant = request.state.tenant
        deadline = target.orchestrator.deadline(requested_timeout(request))
        decision, share = await admit(tenant, target.id, len(images), target.orchestrator.deployments_for(images[0]))
        if body.stream:
            events = stream_events(target.orchestrator, request_id, images, edit, prefix, share, deadline)
            return StreamingResponse(
                released(events, decision.lease), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", **decision.headers},
            )  # fmt: skip

        async def publish(name: str, picture: bytes) -> str:
            base = public_url or str(request.base_url)
            return await asyncio.to_thread(links.save, tenant.name, name, picture, base)

        try:
            response = await generate(target, request_id, body, images, edit, share, publish, deadline)
        except Exception as err:  # noqa: BLE001 - every failure in OpenAI's shape, with the tenant's headers
            error = failure(err)
            error.headers = {**decision.headers, **(error.headers or {})}
            raise error from None
        finally:
            await release(decision.lease)
        return JSONResponse(response, headers=decision.headers)

    async def released(events: AsyncIterator[str], lease: str | None) -> AsyncIterator[str]:
        try:
            async for event in events:
                yield event
        finally:
            await release(lease)

    releasing: set[asyncio.Task] = set()  # held until done: a dropped release would keep the slot taken

    async def release(lease: str | None) -> None:
        """Free the request's concurrency slot before answering, on a task of its own, so that a cancelled
        request frees it too."""

        async def send() -> None:
            try:
                await limits.release.remote(lease)
            except Exception as err:  # noqa: BLE001 - the lease expires on its own (tenancy.lease_s)
                log.warning("could not release a concurrency lease: %s", err)

        task = asyncio.get_running_loop().create_task(send())
        releasing.add(task)
        task.add_done_callback(releasing.discard)
        await asyncio.shield(task)

    def schema(names: list[str], media: str) -> dict:
        """The request body: the one model's schema, or one of the served models' (a request's `model`)."""
        refs = [{"$ref": f"#/components/schemas/{name}"} for name in names]
        body = refs[0] if len(refs) == 1 else {"anyOf": refs}
        return {"requestBody": {"required": True, "content": {media: {"schema": body}}}}

    generation_schemas = [m.request_model.__name__ for m in served.values()]
    edit_schemas = [model.__name__ for m in served.values() for model in m.edit_models.values()]

    @api.post("/v1/images/generations", openapi_extra=schema(generation_schemas, "application/json"))
    async def generations(request: Request):
        try:
            target, body, images = served.generation(json_object(await read_body(request, max_body)))
        except UnknownModel:
            raise
        except InvalidParameter as err:
            raise failure(err) from None
        return await answer(request, target, body, images, None, "image_generation")

    @api.post("/v1/images/edits", openapi_extra=schema(edit_schemas, "multipart/form-data") if edit_schemas else None)
    async def edits(request: Request):
        """OpenAI's image edit: `image` (and `mask`: inpainting) as files, the other fields as form fields."""
        try:
            fields, files = await read_form(request)
            served.named(requested_model(fields))  # an unknown model is a 404 before the files are looked at
            image = one_file(files, "image", required=True)
            mask = one_file(files, "mask", required=False)
            if files:
                raise InvalidParameter(sorted(files)[0], "is not a file this endpoint takes (image, mask)")
            target, body, images, edit = await asyncio.to_thread(served.edit, fields, image, mask, max_pixels)
        except UnknownModel:
            raise
        except InvalidParameter as err:
            raise failure(err) from None
        return await answer(request, target, body, images, edit, "image_edit")

    @app.get(IMAGE_ROUTE + "/{owner}/{name}")
    async def image_file(owner: str, name: str, request: Request, expires: str | None = None,
                         signature: str | None = None):  # fmt: skip
        """A `url` image: open to anyone with its signed link until it expires; without a signature, to
        a key of the tenant that made it. Another tenant's key gets 404."""
        if not (re.fullmatch(r"[0-9a-f]{32}", owner) and re.fullmatch(r"[0-9a-zA-Z_.-]{1,128}\.png", name)):
            raise ApiError(404, f"name: no image {name!r}", param="name", code="not_found")
        if expires is not None or signature is not None:
            refused = links.signer.check(request.url.path, expires, signature)
            if refused is not None:
                raise ApiError(403, f"signature: {refused} link; ask for the image again", param="signature",
                               code="invalid_signature")  # fmt: skip
        else:
            await api_key(request)
            if ImageLinks.owner(request.state.tenant.name) != owner:
                raise ApiError(404, f"name: no image {name!r}", param="name", code="not_found")
        try:
            picture = await asyncio.to_thread(links.blobs.read, links.key(owner, name))
        except FileNotFoundError:
            raise ApiError(404, f"name: no image {name!r} (expired images are deleted)", param="name",
                           code="not_found") from None  # fmt: skip
        # A browser keeps it no longer than its link lasts (the store's TTL when opened with a key).
        lasts = int(expires) - int(time.time()) if expires is not None else int(config.storage.url_ttl_s)
        return Response(picture, media_type="image/png", headers={"Cache-Control": f"private, max-age={max(0, lasts)}"})

    api.include_router(batch_routes(config, batches, wake_runner))
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
            picture = await asyncio.to_thread(final_png, result)
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
