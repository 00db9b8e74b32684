"""The per-stage scheduler: it decides, the executor runs, and `update` reports (vLLM's engine core).

Each iteration of a stage's loop is

    plan = scheduler.schedule()                  # which tasks run in the next step: plain data
    result = executor.execute(plan)              # stages/executor.py: admit, batched step, finish
    report = scheduler.update(plan, result)      # which tasks finished, failed or were cancelled

Step-level (continuous) batching admits waiting tasks into the running batch before every step, up to
`max_batch_size`, and finished tasks leave after the step that finished them. Request-level batching,
the baseline, admits a batch only when the previous one has completely finished. Which waiting task
goes first is the queue policy's choice (`QueuePolicy`: FIFO here; priority classes and weighted fair
share between tenants in stages/fair_share.py), so policies plug in without touching the loop. Every
task has an explicit status, its arrival time and its `Share` (tenant, class, weight).

Preemption: when the batch is full and a waiting task outranks a running one (the policy says when:
an interactive task outranks a batch-class one), the running task goes back to the waiting queue at a
step boundary, keeping its whole sampler state, and resumes later where it stopped. Batch invariance
makes its image the same as if it had never paused.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

from stages.fair_share import DEFAULT_SHARE, FairQueue, Share

Mode = Literal["step", "request"]


class TaskStatus(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class ScheduledTask:
    """One request in one stage, as the scheduler tracks it."""

    request_id: str
    request: Any  # the work order the engine admits
    share: Share = DEFAULT_SHARE
    step_cost: float = 1.0  # what one of its steps costs, for fair share (a stage's pixels)
    expected_steps: int = 1  # the steps it will take, as its work order says
    arrival: float = field(default_factory=time.perf_counter)
    status: TaskStatus = TaskStatus.WAITING
    state: Any = None  # the engine's task, once admitted (kept while preempted)
    preemptions: int = 0
    first_step_at: float | None = None
    batch_sizes: list[int] = field(default_factory=list)  # tasks that shared each of its steps

    @property
    def steps(self) -> int:
        return len(self.batch_sizes)


class QueuePolicy(Protocol):
    """The waiting queue: which waiting task is admitted next, and which may preempt a running one."""

    def push(self, task: ScheduledTask) -> None: ...  # a new task, or a preempted one going back
    def pop(self) -> ScheduledTask: ...
    def peek(self) -> ScheduledTask | None: ...
    def remove(self, task: ScheduledTask) -> None: ...
    def stepped(self, task: ScheduledTask) -> None: ...  # the task took a step
    def leave(self, task: ScheduledTask) -> None: ...  # the task left the stage (finished, failed, cancelled)
    def outranks(self, waiting: ScheduledTask, running: ScheduledTask) -> bool: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[ScheduledTask]: ...


class FifoQueue:
    """First come, first served; never preempts."""

    def __init__(self) -> None:
        self._queue: deque[ScheduledTask] = deque()

    def push(self, task: ScheduledTask) -> None:
        self._queue.append(task)

    def pop(self) -> ScheduledTask:
        return self._queue.popleft()

    def peek(self) -> ScheduledTask | None:
        return self._queue[0] if self._queue else None

    def remove(self, task: ScheduledTask) -> None:
        self._queue.remove(task)

    def stepped(self, task: ScheduledTask) -> None:
        pass

    def leave(self, task: ScheduledTask) -> None:
        pass

    def outranks(self, waiting: ScheduledTask, running: ScheduledTask) -> bool:
        return False

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[ScheduledTask]:
        return iter(self._queue)


@dataclass(frozen=True)
class SchedulePlan:
    """The scheduler's decision for one step."""

    admit: tuple[ScheduledTask, ...]  # waiting tasks to admit (or resume); they take this step
    run: tuple[ScheduledTask, ...]  # running tasks that take this step
    cancelled: tuple[ScheduledTask, ...]  # tasks that left since the last plan without finishing
    preempted: tuple[ScheduledTask, ...] = ()  # running tasks sent back to wait, state kept

    @property
    def tasks(self) -> tuple[ScheduledTask, ...]:
        return self.run + self.admit


@dataclass
class ExecutionResult:
    """What the executor did with a plan (stages/executor.py fills it)."""

    admitted: list[ScheduledTask] = field(default_factory=list)  # admitted: `state` now set
    stepped: list[ScheduledTask] = field(default_factory=list)  # took the step
    finished: list[tuple[ScheduledTask, Any]] = field(default_factory=list)  # with their outputs
    failed: list[tuple[ScheduledTask, BaseException]] = field(default_factory=list)


@dataclass(frozen=True)
class StageReport:
    """What one iteration did: the only thing a stage's loop reads."""

    finished: tuple[tuple[ScheduledTask, Any], ...] = ()
    failed: tuple[tuple[ScheduledTask, BaseException], ...] = ()
    cancelled: tuple[ScheduledTask, ...] = ()
    started: tuple[ScheduledTask, ...] = ()  # took their first step
    preempted: tuple[ScheduledTask, ...] = ()
    stepped: tuple[ScheduledTask, ...] = ()  # took the step

    @property
    def batch_size(self) -> int:  # 0 when no step ran
        return len(self.stepped)


class StageScheduler:
    def __init__(self, max_batch_size: int = 8, mode: Mode = "step", policy: QueuePolicy | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        if mode not in ("step", "request"):
            raise ValueError(f"mode: must be 'step' or 'request', got {mode!r}")
        self.max_batch_size = max_batch_size
        self.mode = mode
        # FairQueue by default: with one tenant in one class it is first come, first served.
        self.waiting: QueuePolicy = policy if policy is not None else FairQueue()
        self._running: list[ScheduledTask] = []
        self._cancelled: list[ScheduledTask] = []
        self._tasks: dict[str, ScheduledTask] = {}  # waiting or running, by request id

    # ---- requests in and out ------------------------------------------------------------------------
    def submit(
        self, request_id: str, request: Any, share: Share = DEFAULT_SHARE, step_cost: float = 1.0
    ) -> ScheduledTask:
        if request_id in self._tasks:
            raise ValueError(f"request_id: {request_id!r} is already in this stage")
        task = ScheduledTask(request_id, request, share, step_cost, getattr(request, "expected_steps", 1))
        self._tasks[request_id] = task
        self.waiting.push(task)
        return task

    def cancel(self, request_id: str) -> bool:
        """A waiting task is dropped now and never runs; a running one leaves before the next step."""
        task = self._tasks.pop(request_id, None)
        if task is None:
            return False
        if task.status is TaskStatus.WAITING:
            self.waiting.remove(task)
        self.waiting.leave(task)
        task.status = TaskStatus.CANCELLED
        self._cancelled.append(task)
        return True

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(t.status is TaskStatus.RUNNING for t in self._running)

    @property
    def has_work(self) -> bool:
        """Anything for the next iteration to do or to report."""
        return bool(self._tasks or self._cancelled)

    # ---- one iteration -----------------------------------------------------------------------------
    def schedule(self) -> SchedulePlan:
        self._running = [t for t in self._running if t.status is TaskStatus.RUNNING]
        cancelled, self._cancelled = tuple(self._cancelled), []
        room = self.max_batch_size - len(self._running)
        if self.mode == "request" and self._running:
            room = 0  # the baseline: a new batch only once the previous one has finished
        admit = [self.waiting.pop() for _ in range(min(room, len(self.waiting)))]
        preempted = self._preempt(admit) if self.mode == "step" else []
        return SchedulePlan(tuple(admit), tuple(self._running), cancelled, tuple(preempted))

    def _preempt(self, admit: list[ScheduledTask]) -> list[ScheduledTask]:
        """While the best waiting task outranks a running one, swap them (the lowest-ranked, latest
        running task goes back first)."""
        preempted = []
        while (head := self.waiting.peek()) is not None:
            victims = [t for t in self._running if self.waiting.outranks(head, t)]
            if not victims:
                break
            victim = max(victims, key=lambda t: (t.share.rank, t.arrival))
            self._running.remove(victim)
            victim.status = TaskStatus.WAITING
            victim.preemptions += 1
            self.waiting.push(victim)
            preempted.append(victim)
            admit.append(self.waiting.pop())
        return preempted

    def update(self, plan: SchedulePlan, result: ExecutionResult) -> StageReport:
        now = time.perf_counter()
        for task in result.admitted:
            task.status = TaskStatus.RUNNING
            self._running.append(task)
        started = []
        for task in result.stepped:
            task.batch_sizes.append(len(result.stepped))
            self.waiting.stepped(task)
            if task.first_step_at is None:
                task.first_step_at = now
                started.append(task)
        for task, _ in result.finished:
            task.status = TaskStatus.FINISHED
        for task, _ in result.failed:
            task.status = TaskStatus.FAILED
        for task, _ in (*result.finished, *result.failed):
            self._tasks.pop(task.request_id, None)
            self.waiting.leave(task)
        self._running = [t for t in self._running if t.status is TaskStatus.RUNNING]
        return StageReport(
            finished=tuple(result.finished),
            failed=tuple(result.failed),
            cancelled=plan.cancelled,
            started=tuple(started),
            preempted=plan.preempted,
            stepped=tuple(result.stepped),
        )
