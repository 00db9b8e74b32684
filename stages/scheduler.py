"""The per-stage scheduler: it decides, the executor runs, and `update` reports (vLLM's engine core).

Each iteration of a stage's loop is

    plan = scheduler.schedule()                  # which tasks run in the next step: plain data
    result = executor.execute(plan)              # stages/executor.py: admit, batched step, finish
    report = scheduler.update(plan, result)      # which tasks finished, failed or were cancelled

Step-level (continuous) batching admits waiting tasks into the running batch before every step, up to
`max_batch_size`, and finished tasks leave after the step that finished them. Request-level batching,
the baseline, admits a batch only when the previous one has completely finished. Which waiting task
goes first is the queue policy's choice (`QueuePolicy`; FIFO here), so priorities and fair share plug
in without touching the loop. Every task has an explicit status and its arrival time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol

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
    arrival: float = field(default_factory=time.perf_counter)
    status: TaskStatus = TaskStatus.WAITING
    state: Any = None  # the engine's task, once admitted
    first_step_at: float | None = None
    batch_sizes: list[int] = field(default_factory=list)  # tasks that shared each of its steps

    @property
    def steps(self) -> int:
        return len(self.batch_sizes)


class QueuePolicy(Protocol):
    """The waiting queue: which waiting task is admitted next."""

    def push(self, task: ScheduledTask) -> None: ...
    def pop(self) -> ScheduledTask: ...
    def remove(self, task: ScheduledTask) -> None: ...
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[ScheduledTask]: ...


class FifoQueue:
    """First come, first served."""

    def __init__(self) -> None:
        self._queue: deque[ScheduledTask] = deque()

    def push(self, task: ScheduledTask) -> None:
        self._queue.append(task)

    def pop(self) -> ScheduledTask:
        return self._queue.popleft()

    def remove(self, task: ScheduledTask) -> None:
        self._queue.remove(task)

    def __len__(self) -> int:
        return len(self._queue)

    def __iter__(self) -> Iterator[ScheduledTask]:
        return iter(self._queue)


@dataclass(frozen=True)
class SchedulePlan:
    """The scheduler's decision for one step."""

    admit: tuple[ScheduledTask, ...]  # waiting tasks to admit; they take this step
    run: tuple[ScheduledTask, ...]  # running tasks that take this step
    cancelled: tuple[ScheduledTask, ...]  # tasks that left since the last plan without finishing

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
    batch_size: int = 0  # tasks that took the step; 0 when no step ran


class StageScheduler:
    def __init__(self, max_batch_size: int = 8, mode: Mode = "step", policy: QueuePolicy | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        if mode not in ("step", "request"):
            raise ValueError(f"mode: must be 'step' or 'request', got {mode!r}")
        self.max_batch_size = max_batch_size
        self.mode = mode
        self.waiting: QueuePolicy = policy if policy is not None else FifoQueue()
        self._running: list[ScheduledTask] = []
        self._cancelled: list[ScheduledTask] = []
        self._tasks: dict[str, ScheduledTask] = {}  # waiting or running, by request id

    # ---- requests in and out ------------------------------------------------------------------------
    def submit(self, request_id: str, request: Any) -> ScheduledTask:
        if request_id in self._tasks:
            raise ValueError(f"request_id: {request_id!r} is already in this stage")
        task = ScheduledTask(request_id, request)
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
        admit = tuple(self.waiting.pop() for _ in range(min(room, len(self.waiting))))
        return SchedulePlan(admit=admit, run=tuple(self._running), cancelled=cancelled)

    def update(self, plan: SchedulePlan, result: ExecutionResult) -> StageReport:
        now = time.perf_counter()
        for task in result.admitted:
            task.status = TaskStatus.RUNNING
            self._running.append(task)
        started = []
        for task in result.stepped:
            task.batch_sizes.append(len(result.stepped))
            if task.first_step_at is None:
                task.first_step_at = now
                started.append(task)
        for task, _ in result.finished:
            task.status = TaskStatus.FINISHED
        for task, _ in result.failed:
            task.status = TaskStatus.FAILED
        for task, _ in (*result.finished, *result.failed):
            self._tasks.pop(task.request_id, None)
        self._running = [t for t in self._running if t.status is TaskStatus.RUNNING]
        return StageReport(
            finished=tuple(result.finished),
            failed=tuple(result.failed),
            cancelled=plan.cancelled,
            started=tuple(started),
            batch_size=len(result.stepped),
        )
