"""In-process step-level scheduler for one stage: decides which tasks run in the next step.

Step-level (continuous) batching admits waiting requests into the running batch before every step,
up to `max_batch_size`, and finished tasks leave after the step that finished them. Request-level
batching, the baseline, admits a batch only when the previous one has completely finished.
The serving layer drives the same object from its replica loop.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from stages.engine import DenoisingStage
from stages.errors import InvalidParameter
from stages.task import StageOutput, StageRequest, Task

Mode = Literal["step", "request"]


class StepBatcher:
    def __init__(self, stage: DenoisingStage, max_batch_size: int = 8, mode: Mode = "step"):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        if mode not in ("step", "request"):
            raise ValueError(f"mode: must be 'step' or 'request', got {mode!r}")
        self.stage = stage
        self.max_batch_size = max_batch_size
        self.mode = mode
        self.waiting: deque[StageRequest] = deque()
        self.running: list[Task] = []
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # tasks per executed step, the latest ones
        self.steps = 0  # steps executed
        self.failures: dict[str, InvalidParameter] = {}  # request id -> why it was refused

    def submit(self, request: StageRequest) -> None:
        self.waiting.append(request)

    def cancel(self, request_id: str) -> bool:
        """Drop a request: waiting ones are removed, running ones leave before the next step."""
        for request in list(self.waiting):
            if request.request_id == request_id:
                self.waiting.remove(request)
                return True
        for task in self.running:
            if task.request_id == request_id:
                task.cancelled = True
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def _admit(self) -> None:
        if self.mode == "request" and self.running:
            return
        room = self.max_batch_size - len(self.running)
        admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
        try:
            self.running.extend(self.stage.admit(admitted))
        except InvalidParameter:
            # One bad request must not take the others down: admit one by one, refusing only it.
            for request in admitted:
                try:
                    self.running.extend(self.stage.admit([request]))
                except InvalidParameter as err:
                    self.failures[request.request_id] = err

    def step(self) -> list[StageOutput]:
        """Admit, run one batched step, and return the outputs of the tasks that finished."""
        self.running = [t for t in self.running if not t.cancelled]
        self._admit()
        if not self.running:
            return []
        self.stage.step(self.running)
        self.steps += 1
        self.batch_sizes.append(len(self.running))
        finished = [t for t in self.running if t.done]
        self.running = [t for t in self.running if not t.done]
        return [self.stage.finish(t) for t in finished]

    def run_until_idle(self) -> list[StageOutput]:
        outputs = []
        while not self.idle:
            outputs.extend(self.step())
        return outputs
