"""The HTTP ingress deployment: it builds one orchestrator per served model over that model's handles
and, in the replica, the HTTP app for the config (`serve/http_app.py`); Ray Serve asks for that app
through `__serve_build_asgi_app__` once the replica is constructed. Each replica reads the tenants'
keys itself (serve/tenancy/directory.py); the limits are counted in one place for all (`limits`)."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.admission import FairAdmission
from serve.config import ServeConfig
from serve.http_app import build_http_app
from serve.orchestrator import Orchestrator, running_replicas
from serve.tenancy.directory import KeyDirectory


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, config: dict, graphs: dict[str, dict[str, DeploymentHandle]], limits: DeploymentHandle):
        """`graphs`: each model's handles by node ("text_encoder", then its stages); `limits`: the
        TenantLimits deployment."""
        self.config = ServeConfig.model_validate(config)
        self.orchestrators = {}
        self.directory = KeyDirectory(self.config)
        self.limits = limits
        limit = self.config.ingress.max_images_in_flight
        admission = FairAdmission(limit, self.config.ingress.interactive_reserve) if limit else None
        for graph in self.config.graphs:
            handles = dict(graphs[graph.model.id])
            encoder = handles.pop("text_encoder")
            self.orchestrators[graph.model.id] = Orchestrator(graph.family, encoder, handles, admission)
        self.deployments = [name for names in self.config.deployment_names() for name in names.values()]

    async def ready(self) -> dict[str, int]:
        status = await asyncio.to_thread(serve.status)
        return running_replicas(status, serve.get_replica_context().app_name, self.deployments)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.config, self.orchestrators, self.ready, self.directory, self.limits)
