"""The HTTP ingress deployment: it builds the orchestrator over the stage handles and, in the replica,
the HTTP app for its family and config (`serve/http_app.py`); Ray Serve asks for that app through
`__serve_build_asgi_app__` once the replica is constructed."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import ServeConfig
from serve.http_app import build_http_app
from serve.orchestrator import Orchestrator, running_replicas


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, encoder: DeploymentHandle, stages: dict[str, DeploymentHandle]):
        self.config = ServeConfig.model_validate(config)
        family = self.config.family
        self.orchestrator = Orchestrator(family, encoder, stages)
        self.deployments = ["TextEncoder", *(spec.title for spec in family.stages)]

    async def ready(self) -> dict[str, int]:
        status = await asyncio.to_thread(serve.status)
        return running_replicas(status, serve.get_replica_context().app_name, self.deployments)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.config, self.orchestrator, self.ready)
