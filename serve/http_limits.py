"""The ingress's side of the tenant limits (serve/tenancy/limits.py): admit a request before any work (an
upload before its body is read, its images once it is parsed), turn a refusal into OpenAI's shape (429
with Retry-After; 503 when a stage is full or the service drains), keep the request's lease renewed while
it runs, and give it back when it ends, even when the client went away (a streamed answer's lease also
when its stream never started; one no path gave back lapses after the longest a request may last)."""

from __future__ import annotations

import asyncio
import logging

from ray.serve.handle import DeploymentHandle

from serve.http_common import ApiError
from serve.metrics import tenant_metrics
from serve.tenancy.limits import Decision, LeaseKeeper, check_fits_a_minute
from serve.tenancy.store import Tenant
from stages.fair_share import Share

log = logging.getLogger(__name__)


class Gate:
    def __init__(self, limits: DeploymentHandle, lease_s: float, max_hold_s: float):
        self.limits = limits
        self.keeper = LeaseKeeper(limits, lease_s, max_hold_s)
        self._releasing: set[asyncio.Task] = set()  # held until done: a dropped release keeps the slot taken

    async def admit(self, tenant: Tenant, model: str, images: int, units: float, stages: list[str]
                    ) -> tuple[Decision, Share]:  # fmt: skip
        """The tenant's limits and room in every stage the images need: 429 past a limit, 503 when a stage
        is full or the service is draining; 400 when the images alone exceed a minute's allowance."""
        check_fits_a_minute(tenant, units)
        decision: Decision = await self.limits.acquire.remote(tenant, images, stages, units)
        return self._admitted(decision, tenant, model, images)

    async def admit_upload(self, tenant: Tenant) -> Decision:
        """Before an upload's body is read: the tenant's request rate, concurrency and uploads in flight."""
        decision: Decision = await self.limits.acquire.remote(tenant, 0, [], 0, True)
        self._refuse(decision, tenant)
        self.keeper.hold(decision.lease)
        return decision

    async def charge(self, decision: Decision, tenant: Tenant, model: str, images: int, units: float,
                     stages: list[str]) -> tuple[Decision, Share]:  # fmt: skip
        """An upload's images, now that its body is parsed, on the lease `admit_upload` took."""
        try:
            check_fits_a_minute(tenant, units)
            charged: Decision = await self.limits.charge.remote(decision.lease, tenant, images, stages, units)
        except BaseException:  # cancelled too (the client left): the lease back
            await self.release(decision.lease)
            raise
        if not charged.allowed:
            self.keeper.forget(decision.lease)
        return self._admitted(charged, tenant, model, images)

    def _admitted(self, decision: Decision, tenant: Tenant, model: str, images: int) -> tuple[Decision, Share]:
        self._refuse(decision, tenant)
        self.keeper.hold(decision.lease)
        share = Share(tenant.id, tenant.priority, tenant.weight, decision.label)
        tenant_metrics().requested(model, share, images)
        return decision, share

    @staticmethod
    def _refuse(decision: Decision, tenant: Tenant) -> None:
        if decision.allowed:
            return
        tenant_metrics().refused(Share(tenant.id, tenant.priority, tenant.weight, decision.label), decision.limit)
        if decision.limit in ("overloaded", "draining"):
            raise ApiError(503, decision.message, kind="server_error", code=decision.limit, headers=decision.headers)
        raise ApiError(429, decision.message, kind=decision.limit, code="rate_limit_exceeded", headers=decision.headers)

    async def release(self, lease: str | None) -> None:
        """Free the request's lease before answering, on a task of its own, so that a cancelled request
        frees it too."""

        async def send() -> None:
            try:
                await self.keeper.release(lease)
            except Exception as err:  # noqa: BLE001 - the lease expires on its own (tenancy.lease_s)
                log.warning("could not release a tenant lease: %s", err)

        task = asyncio.get_running_loop().create_task(send())
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        await asyncio.shield(task)
