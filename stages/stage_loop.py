"""The loop that drives one stage: schedule -> execute -> update, then answer the callers the report
names. No Ray here: a Ray Serve replica runs it in a thread of its own (`start()`), so that the
replica's event loop stays free to accept requests and cancellations; the in-process cascade steps it
from its own event loop (`iterate()`).

Callers and the loop talk through a queue only: `run()` posts a submission and awaits an asyncio future
that the loop resolves when the task finishes, fails or is cancelled; a cancelled `run()` posts a
cancellation, and the task leaves the batch before the next step. Every caller gets an answer: a
failure in one task fails that task (stages/executor.py), and should the loop itself ever die, every
waiting caller gets its error and later calls are refused at once.

A work order may carry a deadline (seconds since the epoch, so that it means the same in every
process): past it, the task leaves the batch at the next step and its caller gets `DeadlineExceeded`.
A stage whose engine says `finish_apart` (a UNet stage: a latent stage's VAE decode, an output's copy
to the host) finishes tasks on a thread of its own when the loop runs on its thread, so the next step
does not wait for a decode; the finisher posts each output back, and the loop's thread answers.

`health()` says whether the loop is alive and stepping: a dead thread, or one that has made no progress
on a non-empty batch for `stall_factor` times its usual step time, is unhealthy (a Ray replica fails its
health check on it and is replaced). `wedge()` is a fault hook for tests: the thread stops stepping.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from stages.errors import DeadlineExceeded, StageFailure
from stages.executor import UNFINISHED, StageExecutor
from stages.fair_share import BATCH, DEFAULT_SHARE, Share
from stages.family import StepEngine
from stages.scheduler import ScheduledTask, StageReport, StageScheduler
from stages.thread_priority import ThreadPriority, can_switch

log = logging.getLogger(__name__)


@dataclass
class StageRecord:
    """What one request did in one stage: the timings and batches a client or dashboard wants."""

    stage: str
    queue_seconds: float  # submitted -> first step
    run_seconds: float  # first step -> finished
    steps: int
    max_batch: int  # most requests that shared one of its steps
    replica: str = ""


@dataclass
class StageLoopStats:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0  # batched steps executed
    task_steps: int = 0  # sum of the batch sizes of those steps
    max_batch: int = 0
    preempted: int = 0  # running tasks sent back to wait for higher-priority work


class LoopMetrics(Protocol):
    def arrived_task(self) -> None: ...
    def started(self, queue_wait_s: float, share: Share) -> None: ...
    def stepped(self, seconds: float, batch: int, finished: int) -> None: ...
    def served(self, share: Share, steps: int, cost: float) -> None: ...  # per tenant, each step
    def preempted(self, share: Share) -> None: ...
    def finished(self, residence_s: float) -> None: ...
    def ended(self, outcome: str) -> None: ...
    def refresh(self, active: int, waiting: int, max_batch: int, max_replicas: int) -> None: ...


@dataclass
class _Caller:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.perf_counter)


class StageLoop:
    def __init__(
        self,
        engine: StepEngine,
        scheduler: StageScheduler,
        *,
        replica: str = "",
        metrics: LoopMetrics | None = None,
        max_replicas: int = 1,
        refresh_s: float = 1.0,
        batch_wait_s: float = 0.0,
        os_priority: bool = False,
    ):
        self.name = engine.name
        self.scheduler = scheduler
        self.executor = StageExecutor(engine)
        self.replica = replica
        self.metrics = metrics
        self.max_replicas = max_replicas
        self.refresh_s = refresh_s
        self.batch_wait_s = batch_wait_s  # an idle stage waits this long for a first batch to fill
        # On a shared CPU, batch-only steps run at the lowest OS priority (stages/thread_priority.py).
        self.os_priority = os_priority and can_switch()
        self._priority: ThreadPriority | None = None
        self.stats = StageLoopStats()
        self.dead: BaseException | None = None
        self._refreshed = 0.0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self._callers: dict[str, _Caller] = {}  # owned by the loop's thread
        self._deadlines: dict[str, float] = {}  # ... and so are these: epoch seconds, by request id
        self._expired: set[str] = set()  # cancelled by their deadline: answered with DeadlineExceeded
        self._thread: threading.Thread | None = None
        self.progressed_at = time.monotonic()  # the last step finished, or the loop last found no work
        self.step_seconds: float | None = None  # a moving average of step times, once one has run
        self._wedged = threading.Event()
        self._finisher: ThreadPoolExecutor | None = None  # finishes tasks beside the step (`start`)

    # ---- called by the callers (any thread's event loop) -------------------------------------------
    async def run(
        self,
        request_id: str,
        request: Any,
        share: Share = DEFAULT_SHARE,
        step_cost: float = 1.0,
        deadline: float | None = None,
    ) -> tuple[Any, StageRecord]:
        """The stage's output for one work order, and what the request did here; `share` says whose work
        it is, `step_cost` what one of its steps costs that tenant's fair share, `deadline` (epoch
        seconds) when it must have finished."""
        if self.dead is not None:
            raise StageFailure(self.name, "replica", "its engine loop has stopped")
        if deadline is not None and time.time() >= deadline:
            raise DeadlineExceeded(self.name)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._post(("submit", request_id, request, _Caller(future, loop), share, step_cost, deadline))
        try:
            return await future
        except asyncio.CancelledError:
            self._post(("cancel", request_id))
            raise

    @property
    def load(self) -> dict[str, int]:
        return {"running": self.scheduler.num_running, "waiting": self.scheduler.num_waiting}

    def start(self) -> StageLoop:
        if getattr(self.executor.engine, "finish_apart", False):
            self._finisher = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-finish")
            self.executor.finish_inline = False
        self._thread = threading.Thread(target=self._thread_main, name=f"{self.name}-engine", daemon=True)
        self._thread.start()
        return self

    def health(self, stall_factor: float = 10.0, min_stall_s: float = 30.0) -> str | None:
        """None while the loop is alive and stepping; else why not (for a replica's health check)."""
        if self.dead is not None:
            return f"{self.name}: the engine loop died ({type(self.dead).__name__})"
        if self._thread is not None and not self._thread.is_alive():
            return f"{self.name}: the engine thread has exited"
        stalled = time.monotonic() - self.progressed_at
        limit = max(min_stall_s, stall_factor * (self.step_seconds or 0.0))
        waiting = self.scheduler.has_work or not self._inbox.empty()  # work it holds, or was sent and never took
        if waiting and stalled > limit:
            return f"{self.name}: no step for {stalled:.0f} s with work waiting (limit {limit:.0f} s)"
        return None

    def wedge(self) -> None:
        """Fault hook (tests): the engine thread stops stepping, as if stuck in a kernel, and stays alive."""
        self._wedged.set()
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._finisher is not None:
            self._finisher.shutdown(wait=False, cancel_futures=True)
        # Whoever still waits (a finish cancelled above, or one whose answer no thread will read) is told.
        self._drain()
        failure = StageFailure(self.name, "replica", "its engine loop was stopped")
        for request_id in list(self._callers):
            self._resolve(request_id, error=failure)

    def _post(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    # ---- the loop ----------------------------------------------------------------------------------
    def _thread_main(self) -> None:
        if self.os_priority:
            self._priority = ThreadPriority()
        try:
            while not self._stopped:
                if self._wedged.is_set():
                    time.sleep(0.1)  # wedged: alive, answering no one
                    continue
                self._wake.clear()
                self._drain()
                self._refresh()
                if not self.scheduler.has_work:
                    self.progressed_at = time.monotonic()
                    self._wake.wait(timeout=self.refresh_s if self.metrics else None)
                    continue
                if self._gathering():
                    self._wake.wait(timeout=self.batch_wait_s)
                    self._drain()
                self.iterate()
        except BaseException as err:  # noqa: BLE001 - must answer every caller, whatever happened
            log.exception("%s: the engine loop died", self.name)
            self.abort(err)

    def _gathering(self) -> bool:
        """An idle stage with room waits `batch_wait_s` once for more arrivals before its first step."""
        return (
            bool(self.batch_wait_s)
            and self.scheduler.num_running == 0
            and (0 < self.scheduler.num_waiting < self.scheduler.max_batch_size)
        )

    def iterate(self) -> bool:
        """Take in what callers posted, then one schedule -> execute -> update; True while work remains."""
        self._drain()
        self._expire()
        if not self.scheduler.has_work:
            return False
        plan = self.scheduler.schedule()
        if self._priority is not None:
            self._priority.set_low(bool(plan.tasks) and all(t.share.priority == BATCH for t in plan.tasks))
        start = time.perf_counter()
        result = self.executor.execute(plan)
        end = time.perf_counter()
        self._answer(self.scheduler.update(plan, result), start, end)
        if plan.tasks:
            took = end - start
            self.step_seconds = took if self.step_seconds is None else 0.9 * self.step_seconds + 0.1 * took
        self.progressed_at = time.monotonic()
        return self.scheduler.has_work

    def _expire(self) -> None:
        """Tasks past their deadline leave now (waiting) or before the next step (running)."""
        if not self._deadlines:
            return
        now = time.time()
        for request_id, deadline in list(self._deadlines.items()):
            if now >= deadline:
                del self._deadlines[request_id]
                if self.scheduler.cancel(request_id):
                    self._expired.add(request_id)

    def abort(self, err: BaseException) -> None:
        """Fail every caller still waiting: the loop cannot go on."""
        self.dead = err
        self._drain()
        failure = StageFailure(self.name, "replica", f"its engine loop stopped ({type(err).__name__})")
        for request_id in list(self._callers):
            self._resolve(request_id, error=failure)

    def _drain(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "submit":
                _, request_id, request, caller, share, step_cost, deadline = message
                try:
                    self.scheduler.submit(request_id, request, share, step_cost)
                except ValueError as err:
                    caller.loop.call_soon_threadsafe(_settle, caller.future, None, err)
                    continue
                self._callers[request_id] = caller
                if deadline is not None:
                    self._deadlines[request_id] = deadline
                self.stats.submitted += 1
                if self.metrics:
                    self.metrics.arrived_task()
            elif message[0] == "finished":
                _, task, output, error, end = message
                self._finished(task, output, error, end)
            else:
                self.scheduler.cancel(message[1])  # reported by the next update()

    def _answer(self, report: StageReport, start: float, end: float) -> None:
        for task in report.cancelled:
            self.stats.cancelled += 1
            expired = task.request_id in self._expired
            self._expired.discard(task.request_id)
            if self.metrics:
                self.metrics.ended("expired" if expired else "cancelled")
            self._resolve(task.request_id, error=DeadlineExceeded(self.name) if expired else asyncio.CancelledError())
        for task in report.started:
            if self.metrics:
                self.metrics.started(task.first_step_at - task.arrival, task.share)
        for task in report.preempted:
            self.stats.preempted += 1
            if self.metrics:
                self.metrics.preempted(task.share)
        if report.batch_size and self.metrics:
            steps: dict[Share, list[float]] = {}
            for task in report.stepped:
                tally = steps.setdefault(task.share, [0, 0.0])
                tally[0] += 1
                tally[1] += task.step_cost
            for share, (count, cost) in steps.items():
                self.metrics.served(share, count, cost)
        if report.batch_size:
            self.stats.steps += 1
            self.stats.task_steps += report.batch_size
            self.stats.max_batch = max(self.stats.max_batch, report.batch_size)
            if self.metrics:
                self.metrics.stepped(end - start, report.batch_size, len(report.finished))
        for task, error in report.failed:
            self._finished(task, None, error, end)
        for task, output in report.finished:
            if output is UNFINISHED:
                self._finisher.submit(self._finish_apart, task)
            else:
                self._finished(task, output, None, end)

    def _finish_apart(self, task: ScheduledTask) -> None:
        """On the finisher's thread: the task's output, posted back to the loop's thread to answer."""
        try:
            output, error = self.executor.finish(task)
        except BaseException as err:  # noqa: BLE001 - the caller must hear of it whatever it was
            output, error = None, StageFailure(self.name, "finishing", f"{type(err).__name__}: {err}")
        self._post(("finished", task, output, error, time.perf_counter()))

    def _finished(self, task: ScheduledTask, output: Any, error: BaseException | None, end: float) -> None:
        if error is not None:
            self.stats.failed += 1
            if self.metrics:
                self.metrics.ended("failed")
            self._resolve(task.request_id, error=error)
            return
        self.stats.completed += 1
        if self.metrics:
            self.metrics.finished(end - task.arrival)
        self._resolve(task.request_id, result=(output, self._record(task, end)))

    def _record(self, task: ScheduledTask, end: float) -> StageRecord:
        started = task.first_step_at or end
        return StageRecord(
            stage=self.name,
            queue_seconds=started - task.arrival,
            run_seconds=end - started,
            steps=task.steps,
            max_batch=max(task.batch_sizes, default=0),
            replica=self.replica,
        )

    def _refresh(self) -> None:
        if self.metrics is None or time.monotonic() - self._refreshed < self.refresh_s:
            return
        self._refreshed = time.monotonic()
        load = self.load
        self.metrics.refresh(load["running"], load["waiting"], self.scheduler.max_batch_size, self.max_replicas)

    def _resolve(self, request_id: str, result: Any = None, error: BaseException | None = None) -> None:
        self._deadlines.pop(request_id, None)
        caller = self._callers.pop(request_id, None)
        if caller is None:
            return
        try:
            caller.loop.call_soon_threadsafe(_settle, caller.future, result, error)
        except RuntimeError:  # its event loop is closed: no one is left to answer
            pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(error, asyncio.CancelledError):
        future.cancel()
    elif error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
