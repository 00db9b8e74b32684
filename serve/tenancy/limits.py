"""Rate and concurrency limits per tenant, one count for every ingress replica.

`RateLimiter` holds, per tenant, a token bucket for requests and one for images (a bucket holds a
minute's allowance and refills continuously, so a tenant may burst up to its per-minute limit and then
gets its rate), and the leases of its requests in flight. An ingress asks `acquire` before any work and
gets a `Decision`: allowed or not, OpenAI's `x-ratelimit-*` headers, a `Retry-After` when refused, and
the tenant's metrics label. Nothing is spent on a refused request. A lease that its ingress never
released (the replica died) expires after `lease_s`.

`TenantLimits` is the Ray Serve deployment around it: one replica, so the limits hold however many
ingress replicas share the load. It also names the tenants in metrics: the top tenants by images
requested get their own `tenant` label, the rest share `other`, which bounds the label's cardinality.
Being the one place every request passes first, it also admits at the edge (serve/admission.py's
`StageRoom`: 503 before any stage work when a stage the request needs is full) and drains: once
`drain()` is called (`ifserve up` on SIGTERM), every new request is refused while those in flight finish.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from ray import serve

from serve.admission import StageRoom
from serve.openai_api import RETRY_AFTER_S
from serve.orchestrator import running_replicas
from serve.tenancy.store import Tenant

OTHER = "other"


@dataclass
class _Bucket:
    capacity: float  # a minute's allowance
    tokens: float
    updated: float

    def refill(self, capacity: float, now: float) -> None:
        self.tokens = min(capacity, self.tokens + (now - self.updated) * capacity / 60)
        self.capacity, self.updated = capacity, now

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` tokens are there."""
        return max(0.0, (amount - self.tokens) * 60 / self.capacity)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again (OpenAI's `x-ratelimit-reset-*`)."""
        return (self.capacity - self.tokens) * 60 / self.capacity


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* (and Retry-After when refused)
    # What refused it: "requests", "images" or "concurrency" (429); "overloaded" or "draining" (503).
    limit: str | None = None
    lease: str | None = None  # to release when the request ends
    label: str = OTHER  # the tenant's name in metrics

    @property
    def message(self) -> str:
        if self.limit == "concurrency":
            return "too many requests in flight for this key's tenant; retry when one has finished"
        if self.limit == "overloaded":
            return f"overloaded, retry later: {self.headers.get('x-ifserve-full', 'a stage')} is full"
        if self.limit == "draining":
            return "the service is shutting down; retry later"
        return f"rate limit reached for {self.limit} per minute; retry after {self.headers.get('Retry-After')} s"


class RateLimiter:
    def __init__(self, top_tenants: int = 10, lease_s: float = 3600.0, clock=time.monotonic):
        self.top_tenants = top_tenants
        self.lease_s = lease_s
        self.clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # lease -> (tenant, expiry)
        self._traffic: Counter[str] = Counter()  # images requested, by tenant

    def acquire(self, tenant: Tenant, images: int) -> Decision:
        now = self.clock()
        self._expire(now)
        self._traffic[tenant.name] += images
        label = self.label(tenant.name)
        requests = self._bucket(tenant.name, "requests", tenant.rpm, now)
        pictures = self._bucket(tenant.name, "images", tenant.ipm, now)
        refused, wait = None, 0.0
        in_flight = sum(1 for owner, _ in self._leases.values() if owner == tenant.name)
        if tenant.max_concurrent is not None and in_flight >= tenant.max_concurrent:
            refused, wait = "concurrency", 1.0  # unknown: when one of its requests ends
        elif requests is not None and requests.tokens < 1:
            refused, wait = "requests", requests.wait_for(1)
        elif pictures is not None and pictures.tokens < images:
            refused, wait = "images", pictures.wait_for(images)
        if refused is None:
            for bucket, amount in ((requests, 1), (pictures, images)):
                if bucket is not None:
                    bucket.tokens -= amount
        headers = {}
        for kind, bucket in (("requests", requests), ("images", pictures)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.tokens)))
                headers[f"x-ratelimit-reset-{kind}"] = duration(bucket.reset_s())
        if refused is not None:
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return Decision(False, headers, refused, label=label)
        lease = uuid.uuid4().hex
        self._leases[lease] = (tenant.name, now + self.lease_s)
        return Decision(True, headers, lease=lease, label=label)

    def release(self, lease: str | None) -> None:
        self._leases.pop(lease, None)

    def holds(self, lease: str) -> bool:
        """Whether the lease is still taken (neither released nor expired)."""
        return lease in self._leases

    @property
    def in_flight(self) -> int:
        """Requests admitted and not ended, all tenants."""
        return len(self._leases)

    def label(self, tenant: str) -> str:
        top = heapq.nlargest(self.top_tenants, self._traffic.items(), key=lambda item: (item[1], item[0]))
        return tenant if any(name == tenant for name, _ in top) else OTHER

    def _bucket(self, tenant: str, kind: str, per_minute: int | None, now: float) -> _Bucket | None:
        if per_minute is None:
            self._buckets.pop((tenant, kind), None)
            return None
        bucket = self._buckets.setdefault((tenant, kind), _Bucket(per_minute, per_minute, now))
        bucket.refill(per_minute, now)  # a changed limit applies at once
        return bucket

    def _expire(self, now: float) -> None:
        for lease in [lease for lease, (_, expiry) in self._leases.items() if expiry <= now]:
            del self._leases[lease]


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s"."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@serve.deployment(num_replicas=1, max_ongoing_requests=1000)  # placed on the head by serve/app.py
class TenantLimits:
    """The one place the limits are counted (see the module's docstring)."""

    def __init__(
        self,
        top_tenants: int = 10,
        lease_s: float = 3600.0,
        rooms: dict[str, tuple[int, int]] | None = None,
        reserved: int = 0,
        refresh_s: float = 1.0,
    ):
        self.limiter = RateLimiter(top_tenants, lease_s)
        self.stages = StageRoom(rooms or {}, reserved)
        self.refresh_s = refresh_s
        self._refreshed = -math.inf
        self._held: dict[str, tuple[list[str], int]] = {}  # lease -> the stages and images it holds
        self.draining = False

    # async: they run one at a time on the replica's event loop, never on two threads at once.
    async def acquire(self, tenant: Tenant, images: int, stages: list[str] | None = None) -> Decision:
        """The tenant's limits, and room for `images` in every one of `stages` (deployment names)."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if self.draining:
            return Decision(False, retry, "draining", label=self.limiter.label(tenant.name))
        stages = stages or []
        await self._refresh_running()
        if not self.stages.fits(stages, images):
            full = next(s for s in stages if s in self.stages.rooms and not self.stages.fits([s], images))
            headers = {**retry, "x-ifserve-full": full}
            return Decision(False, headers, "overloaded", label=self.limiter.label(tenant.name))
        decision = self.limiter.acquire(tenant, images)
        for lease in [lease for lease in self._held if not self.limiter.holds(lease)]:  # expired
            self.stages.give(*self._held.pop(lease))
        if decision.allowed and decision.lease:
            self.stages.take(stages, images)
            self._held[decision.lease] = (stages, images)
        return decision

    async def release(self, lease: str | None) -> None:
        self.limiter.release(lease)
        if lease in self._held:
            self.stages.give(*self._held.pop(lease))

    async def drain(self) -> int:
        """Refuse every new request from now on; the requests in flight, which the caller waits for."""
        self.draining = True
        return self.limiter.in_flight

    async def in_flight(self) -> dict:
        """Requests admitted and not ended, and each stage's admitted images (now and at most)."""
        await self._refresh_running()  # the rooms as they are, even before the first request
        return {"requests": self.limiter.in_flight, "load": dict(self.stages.load), "peak": dict(self.stages.peak),
                "room": {s: self.stages.room(s) for s in self.stages.rooms}}  # fmt: skip

    async def _refresh_running(self) -> None:
        if not self.stages.rooms or time.monotonic() - self._refreshed < self.refresh_s:
            return
        self._refreshed = time.monotonic()
        try:
            status = await asyncio.to_thread(serve.status)
            app = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - keep the last counts; outside Serve there are none
            return
        self.stages.running = running_replicas(status, app, list(self.stages.rooms))

    async def label(self, tenant: str) -> str:
        """The tenant's name in metrics (`other` past the top tenants): for work no request admitted."""
        return self.limiter.label(tenant)
