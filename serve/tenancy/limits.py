"""Rate and concurrency limits per tenant, one count for every ingress replica and the batch runner.

`RateLimiter` holds, per tenant (by its id), a token bucket for requests and one for images (a bucket
holds a minute's allowance and refills continuously, so a tenant may burst up to its per-minute limit and
then gets its rate), and the leases of its requests in flight. An image counts as one, or as the
standard images its cost makes when it costs more (`ServedModel.units`: steps x pixels against the
family's defaults at its largest size), so n = 8 at 1000 steps a stage is charged what it costs. A
request that alone would take more than a minute's allowance is refused outright (`check_fits_a_minute`:
400 naming `n`). An ingress, or the batch runner for each line, asks `acquire` before any work and gets a
`Decision`: allowed or not, OpenAI's `x-ratelimit-*` headers, a `Retry-After` when refused, and the
tenant's metrics label. Nothing is spent on a refused request.

An upload (a file, an edit's pictures) is admitted before its body is read: `acquire(..., upload=True)`
takes the request's token and lease, and at most `max_uploads` of a tenant's leases may be reading a
body at once; once the body is parsed, `charge` counts its images (and stage room) on the same lease.

A lease lives `lease_s` (seconds) unless its holder renews it (`LeaseKeeper`, every quarter of that), so
the leases of an ingress or a runner that died, and the stage room they held, come back within `lease_s`.

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
import logging
import math
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.admission import StageRoom
from serve.openai_api import RETRY_AFTER_S
from serve.orchestrator import running_replicas
from serve.tenancy.store import Tenant
from stages.errors import InvalidParameter

log = logging.getLogger(__name__)
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
        """Seconds until `amount` tokens are there (a minute when the bucket holds none: a limit of 0,
        which the store refuses, but a database written by hand may hold)."""
        if self.capacity <= 0:
            return 60.0
        return max(0.0, (amount - self.tokens) * 60 / self.capacity)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again (OpenAI's `x-ratelimit-reset-*`)."""
        return 0.0 if self.capacity <= 0 else (self.capacity - self.tokens) * 60 / self.capacity


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* (and Retry-After when refused)
    # What refused it: "requests", "images", "concurrency" or "uploads" (429); "overloaded" or "draining" (503).
    limit: str | None = None
    lease: str | None = None  # to release when the request ends
    label: str = OTHER  # the tenant's name in metrics

    @property
    def message(self) -> str:
        if self.limit == "concurrency":
            return "too many requests in flight for this key's tenant; retry when one has finished"
        if self.limit == "uploads":
            return "too many uploads in flight for this key's tenant; retry when one has finished"
        if self.limit == "overloaded":
            return f"overloaded, retry later: {self.headers.get('x-ifserve-full', 'a stage')} is full"
        if self.limit == "draining":
            return "the service is shutting down; retry later"
        return f"rate limit reached for {self.limit} per minute; retry after {self.headers.get('Retry-After')} s"


@dataclass
class _Lease:
    tenant_id: str
    expiry: float
    upload: bool = False  # still reading its body
    stages: list[str] = field(default_factory=list)  # the room it holds (TenantLimits): these stages' ...
    images: int = 0  # ... this many images each


def check_fits_a_minute(tenant: Tenant, units: float) -> None:
    """A request whose images alone cost more than the tenant's minute of images can never be allowed."""
    if tenant.ipm is not None and units > tenant.ipm:
        raise InvalidParameter(
            "n", f"these images count as {units:.4g} standard images (their steps x pixels), more than this "
            f"key's limit of {tenant.ipm} a minute"
        )  # fmt: skip


class RateLimiter:
    def __init__(self, top_tenants: int = 10, lease_s: float = 6.0, max_uploads: int = 2, clock=time.monotonic):
        self.top_tenants = top_tenants
        self.lease_s = lease_s
        self.max_uploads = max_uploads
        self.clock = clock
        self._buckets: dict[tuple[str, str], _Bucket] = {}
        self._leases: dict[str, _Lease] = {}
        self._traffic: Counter[str] = Counter()  # images requested, by tenant name

    def acquire(self, tenant: Tenant, units: float, upload: bool = False) -> Decision:
        """A request of `units` standard images (0: an upload whose images are `charge`d later)."""
        now = self.clock()
        self.expire()
        self._traffic[tenant.name] += max(1, math.ceil(units))
        label = self.label(tenant.name)
        requests = self._bucket(tenant.id, "requests", tenant.rpm, now)
        pictures = self._bucket(tenant.id, "images", tenant.ipm, now)
        refused, wait = None, 0.0
        mine = [lease for lease in self._leases.values() if lease.tenant_id == tenant.id]
        if tenant.max_concurrent is not None and len(mine) >= tenant.max_concurrent:
            refused, wait = "concurrency", 1.0  # unknown: when one of its requests ends
        elif upload and sum(lease.upload for lease in mine) >= self.max_uploads:
            refused, wait = "uploads", 1.0
        elif requests is not None and requests.tokens < 1:
            refused, wait = "requests", requests.wait_for(1)
        elif pictures is not None and units and pictures.tokens < units:
            refused, wait = "images", pictures.wait_for(units)
        if refused is None:
            for bucket, amount in ((requests, 1), (pictures, units)):
                if bucket is not None:
                    bucket.tokens -= amount
        headers = self._headers(requests, pictures)
        if refused is not None:
            headers["Retry-After"] = str(max(1, math.ceil(wait)))
            return Decision(False, headers, refused, label=label)
        lease = uuid.uuid4().hex
        self._leases[lease] = _Lease(tenant.id, now + self.lease_s, upload)
        return Decision(True, headers, lease=lease, label=label)

    def charge(self, lease: str, tenant: Tenant, units: float) -> Decision:
        """The images of a request admitted before its body was read (`acquire(upload=True)`); refused, the
        lease is released."""
        now = self.clock()
        self.expire()
        label = self.label(tenant.name)
        requests = self._bucket(tenant.id, "requests", tenant.rpm, now)
        pictures = self._bucket(tenant.id, "images", tenant.ipm, now)
        held = self._leases.get(lease)
        if held is None or held.tenant_id != tenant.id:  # it lapsed while the body was read: start again
            return Decision(False, {"Retry-After": str(RETRY_AFTER_S)}, "concurrency", label=label)
        if pictures is not None and pictures.tokens < units:
            self.release(lease)
            headers = self._headers(requests, pictures)
            headers["Retry-After"] = str(max(1, math.ceil(pictures.wait_for(units))))
            return Decision(False, headers, "images", label=label)
        if pictures is not None:
            pictures.tokens -= units
        held.upload = False
        return Decision(True, self._headers(requests, pictures), lease=lease, label=label)

    @staticmethod
    def _headers(requests: _Bucket | None, pictures: _Bucket | None) -> dict[str, str]:
        headers = {}
        for kind, bucket in (("requests", requests), ("images", pictures)):
            if bucket is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(int(bucket.capacity))
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(bucket.tokens)))
                headers[f"x-ratelimit-reset-{kind}"] = duration(bucket.reset_s())
        return headers

    def release(self, lease: str | None) -> _Lease | None:
        """The lease ends; what it was (None: it had ended already)."""
        return self._leases.pop(lease, None)

    def hold_room(self, lease: str, stages: list[str], images: int) -> None:
        """Record the stage room the lease holds, given back when it ends."""
        self._leases[lease].stages, self._leases[lease].images = stages, images

    def renew(self, leases: list[str]) -> list[str]:
        """Keep these leases for another `lease_s`; those no longer held (released, or lapsed: a lapsed one
        is not revived)."""
        self.expire()
        expiry, gone = self.clock() + self.lease_s, []
        for lease in leases:
            held = self._leases.get(lease)
            if held is None:
                gone.append(lease)
            else:
                held.expiry = expiry
        return gone

    @property
    def in_flight(self) -> int:
        """Requests admitted and not ended, all tenants."""
        return len(self._leases)

    def label(self, tenant: str) -> str:
        top = heapq.nlargest(self.top_tenants, self._traffic.items(), key=lambda item: (item[1], item[0]))
        return tenant if any(name == tenant for name, _ in top) else OTHER

    def _bucket(self, tenant_id: str, kind: str, per_minute: int | None, now: float) -> _Bucket | None:
        if per_minute is None:
            self._buckets.pop((tenant_id, kind), None)
            return None
        bucket = self._buckets.setdefault((tenant_id, kind), _Bucket(per_minute, per_minute, now))
        bucket.refill(per_minute, now)  # a changed limit applies at once
        return bucket

    def expire(self) -> list[_Lease]:
        """Drop the leases whose holder stopped renewing them; what they were."""
        now = self.clock()
        gone = [lease for lease, held in self._leases.items() if held.expiry <= now]
        return [self._leases.pop(lease) for lease in gone]


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
        lease_s: float = 6.0,
        rooms: dict[str, tuple[int, int]] | None = None,
        reserved: int = 0,
        refresh_s: float = 1.0,
        max_uploads: int = 2,
    ):
        self.limiter = RateLimiter(top_tenants, lease_s, max_uploads)
        self.stages = StageRoom(rooms or {}, reserved)
        self.refresh_s = refresh_s
        self._refreshed = -math.inf
        self.draining = False

    # async: they run one at a time on the replica's event loop, never on two threads at once.
    async def acquire(
        self,
        tenant: Tenant,
        images: int = 0,
        stages: list[str] | None = None,
        units: float | None = None,
        upload: bool = False,
    ) -> Decision:
        """The tenant's limits for `images` counting `units` standard images (default: one each), and room
        for them in every one of `stages` (deployment names). `upload`: the body is still to be read; its
        images are `charge`d once it is."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        if self.draining:
            return Decision(False, retry, "draining", label=self.limiter.label(tenant.name))
        stages = stages or []
        self._expire()
        await self._refresh_running()
        refused = self._no_room(tenant, stages, images)
        if refused is not None:
            return refused
        decision = self.limiter.acquire(tenant, images if units is None else units, upload)
        if decision.allowed and decision.lease:
            self.stages.take(stages, images)
            self.limiter.hold_room(decision.lease, stages, images)
        return decision

    async def charge(self, lease: str, tenant: Tenant, images: int, stages: list[str], units: float) -> Decision:
        """The images of an upload admitted by `acquire(upload=True)`, now that its body is read; refused,
        the lease is released."""
        self._expire()
        await self._refresh_running()
        refused = self._no_room(tenant, stages, images)
        if refused is not None:
            await self.release(lease)
            return refused
        decision = self.limiter.charge(lease, tenant, units)
        if decision.allowed:
            self.stages.take(stages, images)
            self.limiter.hold_room(lease, stages, images)
        return decision

    def _no_room(self, tenant: Tenant, stages: list[str], images: int) -> Decision | None:
        if self.stages.fits(stages, images):
            return None
        full = next(s for s in stages if s in self.stages.rooms and not self.stages.fits([s], images))
        headers = {"Retry-After": str(RETRY_AFTER_S), "x-ifserve-full": full}
        return Decision(False, headers, "overloaded", label=self.limiter.label(tenant.name))

    async def release(self, lease: str | None) -> None:
        ended = self.limiter.release(lease)
        if ended is not None:
            self.stages.give(ended.stages, ended.images)

    async def renew(self, leases: list[str]) -> list[str]:
        """Their holder is alive: keep these leases another `lease_s`. Those no longer held."""
        self._expire()  # before the limiter drops lapsed leases itself: their stage room must come back
        return self.limiter.renew(leases)

    def _expire(self) -> None:
        """Leases whose holder stopped renewing them (it died) end, and give their stage room back."""
        for ended in self.limiter.expire():
            self.stages.give(ended.stages, ended.images)

    async def drain(self) -> int:
        """Refuse every new request from now on; the requests in flight, which the caller waits for."""
        self.draining = True
        self._expire()
        return self.limiter.in_flight

    async def in_flight(self) -> dict:
        """Requests admitted and not ended, and each stage's admitted images (now and at most)."""
        self._expire()
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


class LeaseKeeper:
    """The leases one process (an ingress replica, the batch runner) holds at TenantLimits, renewed every
    quarter of `lease_s` while held, for at most `max_hold_s` each: a lease outlives its holder by at most
    `lease_s`, and one its holder forgot to give back (a request that ended some way no code saw) lapses
    after `max_hold_s`, the longest a request may last."""

    def __init__(self, limits: DeploymentHandle, lease_s: float, max_hold_s: float):
        self.limits, self.every_s, self.max_hold_s = limits, lease_s / 4, max_hold_s
        self.held: dict[str, float] = {}  # lease -> when it stops being renewed
        self._renewer: asyncio.Task | None = None

    def hold(self, lease: str | None) -> None:
        if lease is None:
            return
        self.held.setdefault(lease, time.monotonic() + self.max_hold_s)
        if self._renewer is None or self._renewer.done():  # started in the replica's event loop
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    def forget(self, lease: str | None) -> None:
        """Stop renewing the lease (it ended at TenantLimits)."""
        self.held.pop(lease, None)

    async def release(self, lease: str | None) -> None:
        """Give the lease back now (its request ended)."""
        self.forget(lease)
        if lease is not None:
            await self.limits.release.remote(lease)

    async def _renew(self) -> None:
        while self.held:
            await asyncio.sleep(self.every_s)
            now = time.monotonic()
            for lease in [lease for lease, until in self.held.items() if until <= now]:
                log.warning("a tenant lease was never given back; letting it lapse")
                self.forget(lease)
            try:
                gone = await self.limits.renew.remote(list(self.held))
            except Exception as err:  # noqa: BLE001 - tried again next time; the leases may lapse meanwhile
                log.warning("could not renew %d tenant leases: %s", len(self.held), err)
                continue
            for lease in gone:  # released by another holder (an upload's), or lapsed
                self.forget(lease)
