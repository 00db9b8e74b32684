"""The limits' arithmetic on a hand-driven clock (token buckets, leases, OpenAI's headers, bounded metric
labels) and the ingress's fair admission (class first, then weighted share, slots handed on)."""

from __future__ import annotations

import asyncio

import pytest

from serve.admission import FairAdmission
from serve.tenancy.limits import OTHER, RateLimiter, TenantLimits, check_fits_a_minute, duration
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
    tenant = Tenant("t", id="t-id", rpm=6)
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
    tenant = Tenant("t", id="t-id", rpm=10, ipm=4)
    assert limiter.acquire(tenant, 3).allowed
    refused = limiter.acquire(tenant, 2)
    assert not refused.allowed and refused.limit == "images"
    assert refused.headers["x-ratelimit-remaining-requests"] == "9"  # the refused request took no token
    assert refused.headers["x-ratelimit-remaining-images"] == "1"
    assert limiter.acquire(tenant, 1).allowed


def test_concurrency_leases_are_released_or_expire():
    clock = Clock()
    limiter = RateLimiter(lease_s=60, clock=clock)
    tenant = Tenant("t", id="t-id", max_concurrent=2)
    first, second = limiter.acquire(tenant, 1), limiter.acquire(tenant, 1)
    assert first.allowed and second.allowed
    assert limiter.acquire(tenant, 1).limit == "concurrency"
    limiter.release(first.lease)
    assert limiter.acquire(tenant, 1).allowed
    clock.now += 61  # the leases of an ingress that died free themselves
    assert limiter.acquire(tenant, 1).allowed and limiter.acquire(tenant, 1).allowed


def test_unlimited_tenants_get_no_rate_headers():
    decision = RateLimiter().acquire(Tenant("free", id="free-id"), 5)
    assert decision.allowed and not any(h.startswith("x-ratelimit") for h in decision.headers)


def test_metric_labels_name_only_the_top_tenants():
    limiter = RateLimiter(top_tenants=2)
    for name, images in (("big", 10), ("mid", 5), ("small", 1)):
        limiter.acquire(Tenant(name, id=name), images)
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
    limits = TenantLimits.func_or_class(rooms={"A": (2, 3), "B": (1, 1), "C": (4, -1)}, reserved=1)
    limits.stages.running = {"A": 1, "B": 1, "C": 0}
    limits._refreshed = float("inf")  # no Serve here: keep these counts
    assert [limits.stages.room(s) for s in "ABC"] == [4, 1, float("inf")]
    tenant = Tenant("t", id="t-id")

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


def test_a_limit_of_zero_in_the_database_refuses_with_429_not_a_crash():
    """The store refuses 0 (tests/test_tenancy_store.py); a row written by hand may still hold it."""
    limiter = RateLimiter(clock=Clock())
    for tenant in (Tenant("z", rpm=0, id="z"), Tenant("y", ipm=0, id="y")):
        refused = limiter.acquire(tenant, 1)
        assert not refused.allowed and refused.headers["Retry-After"] == "60"


def test_tenants_are_counted_by_id_not_by_name():
    """A tenant deleted and made again under its name starts with a fresh allowance and no leases."""
    limiter = RateLimiter(clock=Clock())
    old = Tenant("t", rpm=1, max_concurrent=1, id="tenant_old")
    new = Tenant("t", rpm=1, max_concurrent=1, id="tenant_new")
    assert limiter.acquire(old, 1).allowed and not limiter.acquire(old, 1).allowed
    assert limiter.acquire(new, 1).allowed


def test_a_lease_lasts_while_renewed_and_ends_lease_s_after_its_holder_stops():
    clock = Clock()
    limiter = RateLimiter(lease_s=8, clock=clock)
    tenant = Tenant("t", max_concurrent=1, id="t")
    held = limiter.acquire(tenant, 1)
    for _ in range(10):  # 50 s of renewals every 5 s: still held
        clock.now += 5
        assert limiter.renew([held.lease]) == []
    assert limiter.acquire(tenant, 1).limit == "concurrency"
    clock.now += 8  # the holder died: no renewal for lease_s
    assert limiter.renew([held.lease]) == [held.lease] and limiter.acquire(tenant, 1).allowed


def test_an_upload_is_admitted_before_its_body_and_charged_after():
    clock = Clock()
    limiter = RateLimiter(max_uploads=2, clock=clock)
    tenant = Tenant("t", rpm=10, ipm=3, id="t")
    first, second = limiter.acquire(tenant, 0, upload=True), limiter.acquire(tenant, 0, upload=True)
    third = limiter.acquire(tenant, 0, upload=True)
    assert first.allowed and second.allowed and not third.allowed and third.limit == "uploads"
    assert first.headers["x-ratelimit-remaining-images"] == "3"  # nothing charged before the body
    charged = limiter.charge(first.lease, tenant, 2.5)
    assert charged.allowed and charged.headers["x-ratelimit-remaining-images"] == "0"
    assert limiter.acquire(tenant, 0, upload=True).allowed  # first's body is read: one upload slot free
    refused = limiter.charge(second.lease, tenant, 1)  # 0.5 left
    assert not refused.allowed and refused.limit == "images" and limiter.release(second.lease) is None  # ended


def test_images_count_by_cost_and_one_costing_more_than_a_minute_is_a_400():
    from stages.errors import InvalidParameter

    tenant = Tenant("t", ipm=20, id="t")
    check_fits_a_minute(tenant, 20)
    with pytest.raises(InvalidParameter) as refused:
        check_fits_a_minute(tenant, 25.6)
    assert refused.value.param == "n" and "25.6 standard images" in str(refused.value)


def test_a_dead_holders_leases_give_their_stage_room_back():
    limits = TenantLimits.func_or_class(lease_s=0.05, rooms={"A": (1, 0)})
    limits.stages.running = {"A": 1}
    limits._refreshed = float("inf")
    tenant = Tenant("t", id="t")

    async def scenario():
        held = await limits.acquire(tenant, 1, ["A"])
        full = await limits.acquire(tenant, 1, ["A"])
        await asyncio.sleep(0.1)  # never renewed
        return held, full, await limits.in_flight()

    held, full, after = asyncio.run(scenario())
    assert held.allowed and full.limit == "overloaded"
    assert after["requests"] == 0 and after["load"] == {"A": 0}
