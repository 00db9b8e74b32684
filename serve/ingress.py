"""The HTTP ingress deployment: it builds one orchestrator per served model over that model's handles
and, in the replica, the HTTP app for the config (`serve/http_app.py`); Ray Serve asks for that app
through `__serve_build_asgi_app__` once the replica is constructed. Each replica reads the tenants'
keys itself (serve/tenancy/directory.py); the limits are counted in one place for all (`limits`)."""

from __future__ import annotations

import logging
import os

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.admission import FairAdmission
from serve.batch.store import BatchStore
from serve.config import ServeConfig
from serve.database import Database
from serve.http_app import build_http_app
from serve.http_limits import Gate
from serve.http_uploads import Uploads
from serve.orchestrator import build_orchestrators, running_replicas
from serve.served import ImageLinks
from serve.tenancy.directory import KeyDirectory
from serve.workers import CONTROL, run_on


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(
        self,
        config: dict,
        graphs: dict[str, dict[str, DeploymentHandle]],
        limits: DeploymentHandle,
        runner: DeploymentHandle,
    ):
        """`graphs`: each model's handles by node ("text_encoder", then its stages); `limits`: the
        TenantLimits deployment; `runner`: the BatchRunner."""
        self.config = ServeConfig.model_validate(config)
        self.config.check_can_serve()
        # The database is reached when first needed: a replica starts, and serves images with the keys it
        # can check, while it is down (serve/tenancy/directory.py).
        database = Database(self.config.tenancy.database)
        self.directory = KeyDirectory(self.config, database)
        self.limits, self.runner = limits, runner
        limit = self.config.ingress.max_images_in_flight
        admission = FairAdmission(limit, self.config.ingress.interactive_reserve) if limit else None
        self.orchestrators = build_orchestrators(self.config, graphs, admission)
        self.links = ImageLinks.of(self.config, database)
        batch = self.config.batch
        self.batches = BatchStore(database, self.links.blobs, batch.output_ttl_s, batch.max_tenant_bytes)
        self.gate = Gate(limits, self.config.tenancy.lease_s, self.config.longest_request_s())
        self.uploads = Uploads(self.config, self.directory, self.gate, self.batches)
        self.deployments = [name for names in self.config.deployment_names() for name in names.values()]

    async def ready(self) -> dict[str, int]:
        status = await run_on(CONTROL, serve.status)
        return running_replicas(status, serve.get_replica_context().app_name, self.deployments)

    async def stats(self) -> dict:
        """This replica's retries by model and failed stage, and the images it gave up on (tests, ops)."""
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "retries": {model: dict(o.retries) for model, o in self.orchestrators.items()},
            "given_up": {model: o.given_up for model, o in self.orchestrators.items()},
        }

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(
            self.config, self.orchestrators, self.ready, self.directory, self.gate, self.uploads, self.links,
            self.batches, self.wake_runner,
        )  # fmt: skip

    async def admit_upload(self, path: str, headers: dict[str, str]) -> dict:
        """Ray's proxy asks before it reads an upload's body (serve/proxy_files.py)."""
        return await self.uploads.admit(path, headers)

    async def release_upload(self, lease: str) -> None:
        """Ray's proxy gave up on an upload it was spooling (too large, too slow): its lease back."""
        await self.gate.release(lease)

    async def wake_runner(self) -> None:
        """A batch was created or cancelled: the runner looks now rather than at its next poll."""
        try:
            await self.runner.wake.remote()
        except Exception as err:  # noqa: BLE001 - it polls anyway (batch.poll_s)
            logging.getLogger(__name__).warning("could not wake the batch runner: %s", err)
