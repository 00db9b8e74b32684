"""Runs a scheduler's plan on a stage's engine, and keeps every failure to the tasks it concerns.

The phases of one step, each isolated:
- admitting: the waiting tasks' work orders become engine tasks in one call; if that call raises,
  each is admitted alone, and only those that still raise fail (a preempted task resumes as it was);
- denoising: one batched model call over every task; if it raises, it is retried task by task (the
  call changes no task, and with batch invariance a task's output alone is its output in the batch), so
  one poisoned task cannot fail its batch-mates;
- scheduler step: each task's own step; a raise fails that task;
- finishing: each finished task's output (stage III decodes here); a raise fails that task.

Bad input (InvalidParameter) fails its task as it is, naming the parameter; anything else becomes a
StageFailure naming the stage and the phase. Nothing escapes `execute`.
"""

from __future__ import annotations

import logging
from typing import Any

from stages.errors import InvalidParameter, StageFailure
from stages.family import StepEngine
from stages.scheduler import ExecutionResult, ScheduledTask, SchedulePlan

log = logging.getLogger(__name__)


class StageExecutor:
    def __init__(self, engine: StepEngine):
        self.engine = engine
        self.name = engine.name

    def execute(self, plan: SchedulePlan) -> ExecutionResult:
        result = ExecutionResult()
        result.admitted = self._admit(list(plan.admit), result)
        tasks = [*plan.run, *result.admitted]
        for task, output in self._predict(tasks, result):
            try:
                self.engine.advance(task.state, output)
            except Exception as err:  # noqa: BLE001 - fails this task only
                self._fail(result, task, "scheduler step", err)
                continue
            result.stepped.append(task)
        for task in result.stepped:
            if not task.state.done:
                continue
            try:
                result.finished.append((task, self.engine.finish(task.state)))
            except Exception as err:  # noqa: BLE001 - fails this task only
                self._fail(result, task, "finishing", err)
        return result

    def _admit(self, tasks: list[ScheduledTask], result: ExecutionResult) -> list[ScheduledTask]:
        resumed = [t for t in tasks if t.state is not None]  # preempted earlier: their state is kept
        return resumed + self._start([t for t in tasks if t.state is None], result)

    def _start(self, tasks: list[ScheduledTask], result: ExecutionResult) -> list[ScheduledTask]:
        if not tasks:
            return []
        try:
            states = self.engine.admit([t.request for t in tasks])
        except Exception as err:  # noqa: BLE001 - one by one below, failing only those that raise again
            if len(tasks) == 1:
                self._fail(result, tasks[0], "admitting", err)
                return []
            admitted = []
            for task in tasks:
                admitted += self._start([task], result)
            return admitted
        for task, state in zip(tasks, states, strict=True):
            task.state = state
        return tasks

    def _predict(self, tasks: list[ScheduledTask], result: ExecutionResult) -> list[tuple[ScheduledTask, Any]]:
        if not tasks:
            return []
        try:
            return list(zip(tasks, self.engine.predict([t.state for t in tasks]), strict=True))
        except Exception as err:  # noqa: BLE001 - task by task below, failing only those that raise again
            if len(tasks) == 1:
                self._fail(result, tasks[0], "denoising", err)
                return []
            log.warning("%s: a batched call over %d tasks raised (%s); retrying one by one", self.name, len(tasks), err)
            outputs = []
            for task in tasks:
                outputs += self._predict([task], result)
            return outputs

    def _fail(self, result: ExecutionResult, task: ScheduledTask, phase: str, err: Exception) -> None:
        if isinstance(err, InvalidParameter | StageFailure):
            error: Exception = err
        else:
            log.error("%s: %s failed for %s", self.name, phase, task.request_id, exc_info=err)
            error = StageFailure.of(self.name, phase, err)
        result.failed.append((task, error))
