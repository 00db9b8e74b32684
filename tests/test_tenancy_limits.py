"""The limits' arithmetic on a hand-driven clock (token buckets, leases, OpenAI's headers, bounded metric
labels) and the ingress's fair admission (class first, then weighted share, slots handed on)."""

from __future__ import annotations

import asyncio

import pytest

from serve.admission import FairAdmission
from serve.tenancy.limits import OTHER, RateLimiter, duration
from serve.tenancy.store import Tenant
from stages.fair_share import Share


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_a_minutes_burst_then_refills_at_its_rate():
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    tenant = Tenant("t", rpm=6)
    decisions = [limiter.acquire(tenant, 1) for _ in range(7)]
    assert [d.allowed for d in decisions] == [True] * 6 + [False]
    refused = decisions[-1]
    assert refused.limit == "requests" and refused.headers["Retry-After"] == "10"  # one token every 10 s
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.now += 10
    assert limiter.acquire(tenant, 1).allowed
    assert not limiter.acquire(tenant, 1).allowed


def test_images_are_counted_and_a_refused_request_spends_nothing():
    clock = Clock()
    limiter = RateLimiter(clock=clock)
    tenant = Tenant("t", rpm=10, ipm=4)
    assert limiter.acquire(tenant, 3).allowed
    refused = limiter.acquire(tenant, 2)
    assert not refused.allowed and refused.limit == "images"
    assert refused.headers["x-ratelimit-remaining-requests"] == "9"  # the refused request took no token
    assert refused.headers["x-ratelimit-remaining-images"] == "1"
    assert limiter.acquire(tenant, 1).allowed


def test_concurrency_leases_are_released_or_expire():
    clock = Clock()
    limiter = RateLimiter(lease_s=60, clock=clock)
    tenant = Tenant("t", max_concurrent=2)
    first, second = limiter.acquire(tenant, 1), limiter.acquire(tenant, 1)
    assert first.allowed and second.allowed
    assert limiter.acquire(tenant, 1).limit == "concurrency"
    limiter.release(first.lease)
    assert limiter.acquire(tenant, 1).allowed
    clock.now += 61  # the leases of an ingress that died free themselves
    assert limiter.acquire(tenant, 1).allowed and limiter.acquire(tenant, 1).allowed


def test_unlimited_tenants_get_no_rate_headers():
    decision = RateLimiter().acquire(Tenant("free"), 5)
    assert decision.allowed and not any(h.startswith("x-ratelimit") for h in decision.headers)


def test_metric_labels_name_only_the_top_tenants():
    limiter = RateLimiter(top_tenants=2)
    for name, images in (("big", 10), ("mid", 5), ("small", 1)):
        limiter.acquire(Tenant(name), images)
    assert [limiter.label(n) for n in ("big", "mid", "small")] == ["big", "mid", OTHER]


@pytest.mark.parametrize("seconds,text", [(0.02, "20ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s"), (75, "1m15s")])
def test_reset_durations_are_written_as_openai_writes_them(seconds, text):
    assert duration(seconds) == text


def test_admission_hands_slots_by_class_then_fair_share():
    """One slot, held by tenant A's first image; then two more batch images of A, one of B and one
    interactive image queue. The interactive one goes first. B, arriving while A was busy, starts level
    with A (A's earlier service came when B asked for nothing), so A and B alternate, by arrival on a tie."""

    async def scenario() -> list[str]:
        admission = FairAdmission(limit=1)
        order: list[str] = []
        release = asyncio.Event()

        async def image(name: str, share: Share, hold: bool = False) -> None:
            async with admission.slot(name, share, cost=1.0):
                order.append(name)
                if hold:
                    await release.wait()

        first = asyncio.create_task(image("a0", Share("a", "batch"), hold=True))
        await asyncio.sleep(0)
        waiting = [
            asyncio.create_task(image(name, share))
            for name, share in (("a1", Share("a", "batch")), ("a2", Share("a", "batch")),
                                ("b0", Share("b", "batch")), ("i0", Share("i", "interactive")))
        ]  # fmt: skip
        await asyncio.sleep(0)
        assert admission.waiting == 4 and admission.in_flight == 1
        release.set()
        await asyncio.gather(first, *waiting)
        assert admission.in_flight == 0 and admission.waiting == 0
        return order

    assert asyncio.run(scenario()) == ["a0", "i0", "a1", "b0", "a2"]


def test_a_cancelled_waiter_gives_up_its_place():
    async def scenario() -> tuple[int, int, list[str]]:
        admission = FairAdmission(limit=1)
        order: list[str] = []
        release = asyncio.Event()

        async def image(name: str, hold: bool = False) -> None:
            async with admission.slot(name, Share(name), cost=1.0):
                order.append(name)
                if hold:
                    await release.wait()

        holder = asyncio.create_task(image("x", hold=True))
        await asyncio.sleep(0)
        gone, later = asyncio.create_task(image("gone")), asyncio.create_task(image("later"))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(holder, later)
        return admission.in_flight, admission.waiting, order

    assert asyncio.run(scenario()) == (0, 0, ["x", "later"])


def test_interactive_images_may_use_the_reserve_beyond_the_limit():
    async def scenario() -> tuple[list[str], int]:
        admission = FairAdmission(limit=1, reserve=1)
        order: list[str] = []
        release = asyncio.Event()

        async def image(name: str, share: Share) -> None:
            async with admission.slot(name, share, cost=1.0):
                order.append(name)
                await release.wait()

        tasks = [asyncio.create_task(image(name, Share(name[0], priority))) for name, priority in
                 (("a0", "batch"), ("a1", "batch"), ("i0", "interactive"), ("i1", "interactive"))]  # fmt: skip
        for _ in range(3):
            await asyncio.sleep(0)
        in_flight = admission.in_flight  # a0 holds the limit, i0 the reserve; a1 and i1 wait
        release.set()
        await asyncio.gather(*tasks)
        return order, in_flight

    order, in_flight = asyncio.run(scenario())
    assert in_flight == 2 and order[:2] == ["a0", "i0"] and order[2] == "i1"


def test_edge_admission_counts_admitted_images_against_every_stage_they_need():
    """TenantLimits (its class, outside Serve): a stage holds its running replicas' slots plus its queue,
    less the batch runner's; a request that would overfill any stage it needs is refused with 503's
    reason and Retry-After, and takes nothing; ending a request gives its room back; draining refuses all."""
    from serve.tenancy.limits import TenantLimits

    limits = TenantLimits.func_or_class(rooms={"A": (2, 3), "B": (1, 1), "C": (4, -1)}, reserved=1)
    limits.stages.running = {"A": 1, "B": 1, "C": 0}
    limits._refreshed = float("inf")  # no Serve here: keep these counts
    assert [limits.stages.room(s) for s in "ABC"] == [4, 1, float("inf")]
    tenant = Tenant("t")

    async def scenario():
        first = await limits.acquire(tenant, 1, ["A", "B"])
        full = await limits.acquire(tenant, 1, ["A", "B"])
        other_path = await limits.acquire(tenant, 3, ["A", "C"])
        too_many = await limits.acquire(tenant, 1, ["A"])
        await limits.release(first.lease)
        after = await limits.acquire(tenant, 1, ["B"])
        in_flight = await limits.in_flight()
        waiting = await limits.drain()
        drained = await limits.acquire(tenant, 1, ["C"])
        return first, full, other_path, too_many, after, in_flight, waiting, drained

    first, full, other_path, too_many, after, in_flight, waiting, drained = asyncio.run(scenario())
    assert first.allowed and other_path.allowed and after.allowed
    assert not full.allowed and full.limit == "overloaded" and full.headers["Retry-After"]
    assert "B is full" in full.message
    assert not too_many.allowed and too_many.limit == "overloaded"  # A: 1 + 3 taken of 4
    assert in_flight["load"] == {"A": 3, "B": 1, "C": 3} and in_flight["peak"]["A"] == 4
    assert waiting == 2  # other_path and after are still in flight
    assert not drained.allowed and drained.limit == "draining" and drained.headers["Retry-After"]
