"""Runs a scheduler's plan on a stage's engine, and keeps every failure to the tasks it concerns.

The phases of one step, each isolated:
- admitting: the waiting tasks' work orders become engine tasks in one call; if that call raises,
  each is admitted alone, and only those that still raise fail (a preempted task resumes as it was);
- denoising: one batched model call over every task; if it raises, it is retried task by task (the
  call changes no task, and with batch invariance a task's output alone is its output in the batch), so
  one poisoned task cannot fail its batch-mates;
- scheduler step: one batched step over every task where the engine can (`advance_batch`, which
  changes nothing when it raises); else, or after a raise, each task's own step, and a raise fails that
  task;
- finishing: each finished task's output (stage III decodes here); a raise fails that task. A stage loop
  running on a thread of its own finishes tasks on another thread (`finish_inline=False`: the executor
  hands back `UNFINISHED` and the loop calls `finish`), so a decode never holds up the next step.

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


UNFINISHED = object()  # a finished task's output, still to be made by `StageExecutor.finish`


class StageExecutor:
    def __init__(self, engine: StepEngine, finish_inline: bool = True):
        self.engine = engine
        self.name = engine.name
        self.finish_inline = finish_inline

    def execute(self, plan: SchedulePlan) -> ExecutionResult:
        result = ExecutionResult()
        result.admitted = self._admit(list(plan.admit), result)
        tasks = [*plan.run, *result.admitted]
        self._advance(self._predict(tasks, result), result)
        for task in result.stepped:
            if not task.state.done:
                continue
            if not self.finish_inline:
                result.finished.append((task, UNFINISHED))
                continue
            output, error = self.finish(task)
            if error is None:
                result.finished.append((task, output))
            else:
                result.failed.append((task, error))
        return result

    def finish(self, task: ScheduledTask) -> tuple[Any, Exception | None]:
        """A finished task's output, or the error that fails it (from any thread)."""
        try:
            return self.engine.finish(task.state), None
        except Exception as err:  # noqa: BLE001 - fails this task only
            return None, self._error(task, "finishing", err)

    def _advance(self, predicted: list[tuple[ScheduledTask, Any]], result: ExecutionResult) -> None:
        advance_batch = getattr(self.engine, "advance_batch", None)
        if advance_batch is not None and len(predicted) > 1:
            try:
                if advance_batch([t.state for t, _ in predicted], [output for _, output in predicted]):
                    result.stepped.extend(t for t, _ in predicted)
                    return
            except Exception as err:  # noqa: BLE001 - task by task below, failing only those that raise again
                log.warning("%s: a batched scheduler step over %d tasks raised (%s)", self.name, len(predicted), err)
        for task, output in predicted:
            try:
                self.engine.advance(task.state, output)
            except Exception as err:  # noqa: BLE001 - fails this task only
                self._fail(result, task, "scheduler step", err)
                continue
            result.stepped.append(task)

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
        result.failed.append((task, self._error(task, phase, err)))

    def _error(self, task: ScheduledTask, phase: str, err: Exception) -> Exception:
        if isinstance(err, InvalidParameter | StageFailure):
            return err
        log.error("%s: %s failed for %s", self.name, phase, task.request_id, exc_info=err)
        return StageFailure.of(self.name, phase, err)
