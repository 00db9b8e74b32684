"""Admission at the ingress: at most `limit` images in the stages at once (`ingress.max_images_in_flight`);
the rest wait here, ordered by the same policy as every stage's queue (stages/fair_share.py): priority
class first, then weighted fair share between tenants by cost (an image's steps x pixels over its
stages), then arrival. So a flood of batch-class images queues behind interactive ones here too.
Interactive images may take `reserve` slots beyond the limit (`ingress.interactive_reserve`), so one
need not wait for a batch image to finish when batch work fills every slot."""

from __future__ import annotations

import asyncio
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
