"""Driving a stage's scheduler and executor by hand, one iteration at a time, as its loop does."""

from __future__ import annotations

from stages.executor import StageExecutor
from stages.families import DEEPFLOYD_IF
from stages.scheduler import StageReport, StageScheduler


def iterate(scheduler: StageScheduler, executor: StageExecutor) -> StageReport:
    plan = scheduler.schedule()
    return scheduler.update(plan, executor.execute(plan))


def stage_request(stage: str, request_id: str, params, **inputs):
    """IF's work order of `params` for `stage`."""
    return DEEPFLOYD_IF.stage_request(DEEPFLOYD_IF.stage(stage), request_id, params, **inputs)
