"""The HTTP ingress (FastAPI): auth, validation, the OpenAI-shaped API; `Orchestrator` runs the graph.

Routes: POST /v1/images/generations, GET /v1/images/files/{name}, GET /v1/models[/{id}],
GET /healthz, GET /readyz, /openapi.json and /docs (FastAPI's own).

No `from __future__ import annotations` here: Ray ships this class by value, and FastAPI must see the
real annotation objects (`Request`, the body model) to bind parameters.
"""

import asyncio
import base64
import re
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from serve.api import ImageGenerationRequest, error_response, retry_later
from serve.config import ServeConfig
from serve.metrics import request_metrics
from serve.orchestrator import Orchestrator, Overloaded, png, running_replicas
from stages.errors import InvalidParameter

app = FastAPI(
    title="ifserve",
    summary="DeepFloyd IF cascade on Ray Serve, OpenAI Images API compatible",
    version="0.1.0",
)


@app.middleware("http")
async def _record_request(request: Request, call_next):
    """End-to-end latency to the last byte (streams included) and outcome, by route template."""
    start = time.perf_counter()
    response = await call_next(request)
    route = request.scope.get("route")
    endpoint = getattr(route, "path", "unmatched")  # the template, never the raw path: bounded labels
    body = response.body_iterator

    async def timed_body():
        try:
            async for chunk in body:
                yield chunk
        finally:
            request_metrics().observe(endpoint, response.status_code, time.perf_counter() - start)

    response.body_iterator = timed_body()
    return response


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    return error_response(400, f"{param}: {message}" if param else message, param=param)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    return error_response(exc.status_code, str(exc.detail), kind="invalid_request_error")


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, config: dict, encoder: DeploymentHandle, stages: dict[str, DeploymentHandle]):
        self.config = ServeConfig.model_validate(config)
        self.family = self.config.family
        self.orchestrator = Orchestrator(self.family, encoder, stages)
        self.limits = self.family.checkpoint_limits(self.config.checkpoint_root())
        self.image_dir = Path(self.config.ingress.image_dir).expanduser().resolve()
        self.deployments = ["TextEncoder", *(spec.title for spec in self.family.stages)]

    # ---- plumbing ----------------------------------------------------------------------------------
    def _denied(self, request: Request):
        keys = self.config.auth
        if not keys.api_key_sha256:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and keys.accepts(token.strip()):
            return None
        return error_response(401, "missing or invalid API key (Authorization: Bearer ...)", code="invalid_api_key")

    def _model_error(self, model: str | None):
        if model is None or model == self.config.model.id:
            return None
        return error_response(
            404,
            f"model: {model!r} is not served here; GET /v1/models lists the models",
            param="model",
            code="model_not_found",
        )

    # ---- health ------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        """Ready when every deployment of the graph has a running replica; otherwise names the missing."""
        status = await asyncio.to_thread(serve.status)
        replicas = running_replicas(status, serve.get_replica_context().app_name, self.deployments)
        missing = [name for name, count in replicas.items() if count < 1]
        if missing:
            return retry_later(f"not ready: no running replica of {', '.join(missing)}", "not_ready")
        return {"status": "ready", "replicas": replicas}

    # ---- models ------------------------------------------------------------------------------------
    def _model_card(self) -> dict:
        return {
            "id": self.config.model.id,
            "object": "model",
            "created": 0,
            "owned_by": "ifserve",
            "family": self.family.name,
            "sizes": [f"{s.output_size}x{s.output_size}" for s in self.family.stages],
        }

    @app.get("/v1/models")
    async def models(self, request: Request):
        if denied := self._denied(request):
            return denied
        return {"object": "list", "data": [self._model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request):
        if denied := self._denied(request) or self._model_error(model_id):
            return denied
        return self._model_card()

    # ---- images ------------------------------------------------------------------------------------
    @app.post("/v1/images/generations")
    async def generations(self, body: ImageGenerationRequest, request: Request):
        if denied := self._denied(request) or self._model_error(body.model):
            return denied
        try:
            images = body.generation_params()
            self.family.check_params(images[0], self.limits)
        except InvalidParameter as err:
            return error_response(400, str(err), param=err.param)
        request_id = uuid.uuid4().hex
        if body.stream:
            events = self.orchestrator.stream(request_id, images)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            results = await self.orchestrator.images(request_id, images)
        except Overloaded as err:
            return retry_later(f"overloaded, retry later: {err}", "overloaded")
        except InvalidParameter as err:
            return error_response(400, str(err), param=err.param)
        data = []
        for i, (params, result) in enumerate(zip(images, results, strict=True)):
            picture = await asyncio.to_thread(png, result)
            item = {"revised_prompt": None, "seed": params.seed, "stages": result.timings()}
            if body.response_format == "url":
                item["url"] = self._save(f"{request_id}-{i}.png", picture, request)
            else:
                item["b64_json"] = base64.b64encode(picture).decode()
            data.append(item)
        return {"created": int(time.time()), "model": self.config.model.id, "id": request_id, "data": data}

    @app.get("/v1/images/files/{name}")
    async def image_file(self, name: str, request: Request):
        if denied := self._denied(request):
            return denied
        path = self.image_dir / name
        if not re.fullmatch(r"[0-9a-f]{32}-\d+\.png", name) or not path.is_file():
            return error_response(404, f"name: no image {name!r}", param="name", code="not_found")
        return FileResponse(path, media_type="image/png")

    def _save(self, name: str, png: bytes, request: Request) -> str:
        self.image_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.image_dir / f".{name}.tmp"
        tmp.write_bytes(png)
        tmp.replace(self.image_dir / name)  # readers never see a half-written file
        return str(request.url_for("image_file", name=name))
