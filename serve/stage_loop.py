"""The engine loop of one stage replica: a thread that owns a `StepBatcher` and steps it while there
is work, so that the replica's asyncio event loop stays free to accept requests and cancellations.

The event loop and the thread talk through a queue only: `run()` posts a submission and awaits an
asyncio future that the thread resolves when the task finishes (or fails); a cancelled `run()` posts a
cancellation, and the task leaves the batch before the next step. No Ray here: the deployment wraps it
and hands in its `StageMetrics` (anything with the same methods; None records nothing).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from stages.batching import StepBatcher
from stages.task import StageOutput, StageRequest

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


class LoopMetrics(Protocol):
    def arrived_task(self) -> None: ...
    def started(self, queue_wait_s: float) -> None: ...
    def stepped(self, seconds: float, batch: int, finished: int) -> None: ...
    def finished(self, residence_s: float) -> None: ...
    def ended(self, outcome: str) -> None: ...
    def refresh(self, active: int, waiting: int, max_batch: int, max_replicas: int) -> None: ...


@dataclass
class _Pending:
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None


class StageLoop:
    def __init__(
        self,
        batcher: StepBatcher,
        name: str,
        replica: str = "",
        metrics: LoopMetrics | None = None,
        max_replicas: int = 1,
        refresh_s: float = 1.0,
    ):
        self.batcher = batcher
        self.name = name
        self.replica = replica
        self.metrics = metrics
        self.max_replicas = max_replicas
        self.refresh_s = refresh_s
        self._refreshed = 0.0
        self.stats = StageLoopStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self._pending: dict[str, _Pending] = {}  # owned by the loop thread
        self._thread = threading.Thread(target=self._run, name=f"{name}-engine", daemon=True)
        self._thread.start()

    # ---- called on the replica's event loop -----------------------------------------------------
    async def run(self, request: StageRequest) -> tuple[StageOutput, StageRecord]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._post(("submit", request, _Pending(future, loop)))
        try:
            return await future
        except asyncio.CancelledError:
            self._post(("cancel", request.request_id))
            raise

    @property
    def load(self) -> dict[str, int]:
        return {"running": len(self.batcher.running), "waiting": len(self.batcher.waiting)}

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _post(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    # ---- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopped:
            self._wake.clear()
            self._drain()
            self._refresh()
            if self.batcher.idle:
                self._wake.wait(timeout=self.refresh_s if self.metrics else None)
                continue
            self._step()

    def _refresh(self) -> None:
        if self.metrics is None or time.monotonic() - self._refreshed < self.refresh_s:
            return
        self._refreshed = time.monotonic()
        load = self.load
        self.metrics.refresh(load["running"], load["waiting"], self.batcher.max_batch_size, self.max_replicas)

    def _drain(self) -> None:
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "submit":
                _, request, pending = message
                self._pending[request.request_id] = pending
                self.batcher.submit(request)
                self.stats.submitted += 1
                if self.metrics:
                    self.metrics.arrived_task()
            elif self.batcher.cancel(message[1]):
                self._pending.pop(message[1], None)
                self.stats.cancelled += 1
                if self.metrics:
                    self.metrics.ended("cancelled")

    def _step(self) -> None:
        now = time.perf_counter()
        steps_before = self.batcher.steps
        try:
            outputs = self.batcher.step()
        except Exception as err:  # noqa: BLE001 - e.g. out of memory: fail this batch, keep serving
            log.exception("%s: a batched step failed; failing its %d tasks", self.name, len(self.batcher.running))
            for task in self.batcher.running:
                self._resolve(task.request_id, error=RuntimeError(f"{self.name}: step failed: {err}"))
            self.batcher.running = []
            return
        end = time.perf_counter()
        for request_id, error in self.batcher.failures.items():
            self._resolve(request_id, error=error)
        self.batcher.failures.clear()
        if self.batcher.steps == steps_before:
            return  # every admitted request was refused: no step ran
        for task in self.batcher.running:
            self._mark_started(task.request_id, now)
        for output in outputs:
            self._mark_started(output.request_id, now)
        self.stats.steps += 1
        batch = self.batcher.batch_sizes[-1]
        self.stats.task_steps += batch
        self.stats.max_batch = max(self.stats.max_batch, batch)
        if self.metrics:
            self.metrics.stepped(end - now, batch, len(outputs))
        for output in outputs:
            pending = self._pending.get(output.request_id)
            if pending is None:
                continue
            started = pending.started_at or now
            record = StageRecord(
                stage=self.name,
                queue_seconds=started - pending.submitted_at,
                run_seconds=end - started,
                steps=output.steps,
                max_batch=max(output.step_batch_sizes, default=0),
                replica=self.replica,
            )
            self.stats.completed += 1
            if self.metrics:
                self.metrics.finished(end - pending.submitted_at)
            self._resolve(output.request_id, result=(output, record))

    def _mark_started(self, request_id: str, when: float) -> None:
        pending = self._pending.get(request_id)
        if pending is not None and pending.started_at is None:
            pending.started_at = when
            if self.metrics:
                self.metrics.started(when - pending.submitted_at)

    def _resolve(self, request_id: str, result=None, error: BaseException | None = None) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        if error is not None:
            self.stats.failed += 1
            if self.metrics:
                self.metrics.ended("failed")
        pending.loop.call_soon_threadsafe(_settle, pending.future, result, error)


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
