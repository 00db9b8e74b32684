"""Whose work a task is, and the waiting-queue policy that shares a stage between tenants.

`FairQueue` orders waiting tasks by priority class first (interactive before batch), then by weighted
fair share between the tenants of a class, then by arrival within a tenant. Fair share counts cost,
not requests, after the virtual token counter of "Fairness in Serving Large Language Models" (Sheng
et al., OSDI '24): each tenant has a counter of the service it got, divided by its weight, and the next
slot goes to the waiting tenant with the lowest counter. A task's cost is its steps x its pixels (a
1024 px step costs 256x a 64 px one). Unlike an LLM's output, a diffusion task's length is known when
it is admitted, so the whole cost is charged then (several slots filled at once stay fair); a task that
leaves early is refunded the steps it did not take, and one that runs longer pays per extra step.
A tenant coming back from idle starts level with the least-served busy tenant, so idling banks no
credit. The policy is work-conserving: it only orders
waiting tasks, so batch-class work fills whatever interactive work leaves.

The same policy orders the ingress's admission queue (serve/admission.py), one image at a time.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

PRIORITIES = ("interactive", "batch")  # in order of precedence
INTERACTIVE, BATCH = PRIORITIES
_RANK = {name: rank for rank, name in enumerate(PRIORITIES)}


@dataclass(frozen=True)
class Share:
    """The tenant a task works for, its priority class and its weight within the class; it travels with
    the task through every stage. `label` names the tenant in metrics (bounded: see serve/tenancy)."""

    tenant: str = "default"
    priority: str = "interactive"
    weight: float = 1.0
    label: str = "default"

    def __post_init__(self) -> None:
        if self.priority not in _RANK:
            raise ValueError(f"priority: must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")
        if not self.weight > 0:
            raise ValueError(f"weight: must be > 0, got {self.weight}")

    @property
    def rank(self) -> int:
        return _RANK[self.priority]


DEFAULT_SHARE = Share()


class ScheduledTask(Protocol):
    """What the policy reads of a waiting task (stages/scheduler.py's ScheduledTask; the ingress's tickets)."""

    share: Share
    arrival: float
    state: Any  # None until first admitted
    step_cost: float
    expected_steps: int

    @property
    def steps(self) -> int: ...


class FairQueue:
    """Priority class, then the least weighted service (a virtual counter per tenant), then arrival."""

    def __init__(self) -> None:
        # class -> tenant -> its waiting tasks by arrival (a preempted task goes back in its place)
        self._waiting: list[dict[str, list[ScheduledTask]]] = [{} for _ in PRIORITIES]
        self.service: dict[str, float] = {}  # tenant -> cost served / weight
        self._active: Counter[str] = Counter()  # tenant -> its tasks waiting or running here
        self._members: set[int] = set()  # ids of the tasks counted in _active
        self._last = 0.0  # the counter of the tenant served last: where a returning tenant starts when no one waits

    def push(self, task: ScheduledTask) -> None:
        tenant = task.share.tenant
        if id(task) not in self._members:  # new here (a preempted task is still active)
            if not self._active[tenant]:
                self._lift(tenant)
            self._active[tenant] += 1
            self._members.add(id(task))
        bisect.insort(self._waiting[task.share.rank].setdefault(tenant, []), task, key=_arrival)

    def pop(self) -> ScheduledTask:
        tenants, tenant = self._next()
        task = tenants[tenant].pop(0)
        if not tenants[tenant]:
            del tenants[tenant]
        if task.state is None:  # admitted for the first time (a resumed task has paid)
            self._charge(task, task.step_cost * task.expected_steps)
        return task

    def peek(self) -> ScheduledTask | None:
        try:
            tenants, tenant = self._next()
        except IndexError:
            return None
        return tenants[tenant][0]

    def _next(self) -> tuple[dict[str, list[ScheduledTask]], str]:
        """The highest class with waiting tasks, and in it the least-served tenant (earliest on a tie)."""
        for tenants in self._waiting:
            if tenants:
                return tenants, min(tenants, key=lambda t: (self.service.get(t, 0.0), tenants[t][0].arrival))
        raise IndexError("pop from an empty queue")

    def remove(self, task: ScheduledTask) -> None:
        tasks = self._waiting[task.share.rank][task.share.tenant]
        tasks.remove(task)
        if not tasks:
            del self._waiting[task.share.rank][task.share.tenant]

    def stepped(self, task: ScheduledTask) -> None:
        if task.steps > task.expected_steps:  # ran past what it paid for
            self._charge(task, task.step_cost)

    def leave(self, task: ScheduledTask) -> None:
        if id(task) in self._members:
            self._members.discard(id(task))
            self._active[task.share.tenant] -= 1
            if task.state is not None and task.steps < task.expected_steps:  # paid, left early: refund
                self._charge(task, -task.step_cost * (task.expected_steps - task.steps))

    def _charge(self, task: ScheduledTask, cost: float) -> None:
        tenant = task.share.tenant
        self.service[tenant] = self.service.get(tenant, 0.0) + cost / task.share.weight
        self._last = self.service[tenant]

    def outranks(self, waiting: ScheduledTask, running: ScheduledTask) -> bool:
        """Whether `waiting` may take `running`'s place in a full batch: only across priority classes."""
        return waiting.share.rank < running.share.rank

    def _lift(self, tenant: str) -> None:
        busy = [self.service.get(t, 0.0) for t, n in self._active.items() if n and t != tenant]
        floor = min(busy) if busy else self._last
        self.service[tenant] = max(self.service.get(tenant, 0.0), floor)

    def __len__(self) -> int:
        return sum(len(tasks) for tenants in self._waiting for tasks in tenants.values())

    def __iter__(self) -> Iterator[ScheduledTask]:
        return (task for tenants in self._waiting for tasks in tenants.values() for task in tasks)


def _arrival(task: ScheduledTask) -> float:
    return task.arrival
