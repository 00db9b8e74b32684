"""Admission at the ingress. `StageRoom` (below) admits or refuses at the edge, for all ingress replicas
at once. Then, in each replica: at most `limit` images in the stages at once (`ingress.max_images_in_flight`);
the rest wait here, ordered by the same policy as every stage's queue (stages/fair_share.py): priority
class first, then weighted fair share between tenants by cost (an image's steps x pixels over its
stages), then arrival. So a flood of batch-class images queues behind interactive ones here too.
Interactive images may take `reserve` slots beyond the limit (`ingress.interactive_reserve`), so one
need not wait for a batch image to finish when batch work fills every slot."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from stages.fair_share import INTERACTIVE, FairQueue, Share
from stages.scheduler import ScheduledTask, TaskStatus


class FairAdmission:
    def __init__(self, limit: int, reserve: int = 0):
        self.limit = limit
        self.reserve = reserve
        self.in_flight = 0
        self.queue = FairQueue()

    @property
    def waiting(self) -> int:
        return len(self.queue)

    @asynccontextmanager
    async def slot(self, request_id: str, share: Share, cost: float) -> AsyncIterator[None]:
        """Hold one of the slots while the body runs; wait for it in fair order first."""
        ticket = ScheduledTask(request_id, asyncio.get_running_loop().create_future(), share, cost)
        self.queue.push(ticket)
        self._hand_out()
        try:
            await ticket.request
        except asyncio.CancelledError:
            if ticket.status is TaskStatus.CANCELLED:  # already taken out by _hand_out
                pass
            elif ticket.request.cancelled():  # still waiting
                self.queue.remove(ticket)
                self.queue.leave(ticket)
            else:  # given a slot as it was cancelled
                self._release(ticket)
            raise
        try:
            yield
        finally:
            self._release(ticket)

    def _release(self, ticket: ScheduledTask) -> None:
        self.queue.leave(ticket)
        self.in_flight -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        while (head := self.queue.peek()) is not None:
            if self.in_flight >= self.limit + (self.reserve if head.share.priority == INTERACTIVE else 0):
                return
            ticket = self.queue.pop()  # charges the image's cost to its tenant
            if ticket.request.cancelled():  # its caller left before its turn
                ticket.status = TaskStatus.CANCELLED
                self.queue.leave(ticket)
                continue
            self.in_flight += 1
            ticket.request.set_result(None)


class StageRoom:
    """Edge admission: how many images each stage deployment can hold, and how many admitted images still
    need it, counted once for every ingress replica (in `TenantLimits`). A stage holds what its running
    replicas take in (`max_ongoing_requests` each) plus its router queue (`max_queued_requests`), less
    what the batch runner may have there (`reserved`). An image is admitted only when every stage it needs
    has room for it, counting the images already admitted that have not finished, so one that would be
    shed is refused before the first stage spends anything, and the queues in front of the stages stay
    bounded. An admitted image holds its room in every stage until its request ends: simple, and never
    over-admits. With no replica running (scaled to zero), a stage holds its queue: the first images wake
    it."""

    def __init__(self, rooms: dict[str, tuple[int, int]], reserved: int = 0):
        self.rooms = rooms  # deployment -> (max_ongoing_requests per replica, max_queued_requests; -1: none)
        self.reserved = reserved
        self.running: dict[str, int] = {}
        self.load: dict[str, int] = {name: 0 for name in rooms}
        self.peak: dict[str, int] = {name: 0 for name in rooms}

    def room(self, stage: str) -> float:
        per_replica, queued = self.rooms[stage]
        if queued < 0:
            return math.inf
        return self.running.get(stage, 0) * per_replica + queued - self.reserved

    def fits(self, stages: list[str], images: int) -> bool:
        return all(self.load[s] + images <= self.room(s) for s in stages if s in self.rooms)

    def take(self, stages: list[str], images: int) -> None:
        for stage in stages:
            if stage in self.rooms:
                self.load[stage] += images
                self.peak[stage] = max(self.peak[stage], self.load[stage])

    def give(self, stages: list[str], images: int) -> None:
        for stage in stages:
            if stage in self.rooms:
                self.load[stage] = max(0, self.load[stage] - images)
