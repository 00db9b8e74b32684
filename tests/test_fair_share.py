"""Priority classes, weighted fair share and preemption in a stage's scheduler, on the real engines of
the tiny cascade: counted in steps, never in seconds."""

from __future__ import annotations

import asyncio
import os
import threading

import pytest

from stages.executor import StageExecutor
from stages.fair_share import FairQueue, Share
from stages.scheduler import ScheduledTask, StageScheduler
from stages.stage_loop import StageLoop
from stages.thread_priority import LOWEST, can_switch
from tests.stepping import iterate
from tests.test_exactness import CASES, STAGES, _max_diff, _stage_request
from tests.test_exactness import references as references  # noqa: F401 - the module fixture
from tests.test_scheduler import embeddings as embeddings  # noqa: F401 - the module fixture
from tests.test_scheduler import work_order

INTERACTIVE = Share("alice", "interactive", label="alice")
BATCH = Share("bob", "batch", label="bob")


def test_interactive_tasks_go_first_whatever_their_arrival(cascade, embeddings):
    scheduler = StageScheduler(max_batch_size=1)
    executor = StageExecutor(cascade.stages["stage1"])
    for i in range(3):
        scheduler.submit(f"batch-{i}", work_order("stage1", i, 2, embeddings), BATCH)
    for i in range(3):
        scheduler.submit(f"interactive-{i}", work_order("stage1", 10 + i, 2, embeddings), INTERACTIVE)
    order = []
    while scheduler.has_work:
        report = iterate(scheduler, executor)
        order += [task.request_id for task, _ in report.finished]
    assert order == [*(f"interactive-{i}" for i in range(3)), *(f"batch-{i}" for i in range(3))]


def test_weighted_shares_follow_the_weights_under_backlog(cascade, embeddings):
    """Two batch-class tenants, weights 1 and 3, both backlogged: while both wait, the task-steps they get
    are 1:3 within 10 %."""
    light, heavy = Share("light", "batch", weight=1.0), Share("heavy", "batch", weight=3.0)
    scheduler = StageScheduler(max_batch_size=4)
    executor = StageExecutor(cascade.stages["stage1"])
    for i in range(24):
        scheduler.submit(f"light-{i}", work_order("stage1", i, 2, embeddings), light)
        scheduler.submit(f"heavy-{i}", work_order("stage1", 100 + i, 2, embeddings), heavy)
    steps = {"light": 0, "heavy": 0}
    while all(any(t.share.tenant == name for t in scheduler.waiting) for name in steps):
        report = iterate(scheduler, executor)
        assert not report.failed
        for task in report.stepped:
            steps[task.share.tenant] += 1
    assert sum(steps.values()) >= 40, steps  # a long enough window to judge
    assert steps["heavy"] / steps["light"] == pytest.approx(3.0, rel=0.10), steps


def test_fair_share_counts_pixels_not_requests():
    """A tenant whose steps cost 16x (256 px against 64 px) gets a sixteenth of the steps."""
    queue = FairQueue()
    small, large = Share("small"), Share("large")
    served = {"small": 0, "large": 0}
    tasks = [ScheduledTask(f"{s.tenant}-{i}", None, s, cost) for i in range(400) for s, cost in
             ((small, 64 * 64), (large, 256 * 256))]  # fmt: skip
    for task in tasks:
        queue.push(task)
    for _ in range(170):
        served[queue.pop().share.tenant] += 1  # each pays its cost as it is admitted
    assert served["small"] == pytest.approx(16 * served["large"], rel=0.1), served


def test_an_idle_tenant_banks_no_credit():
    """A tenant arriving after another has been served alone starts level with it, not at zero: the two
    then alternate instead of the newcomer taking every slot."""
    queue = FairQueue()
    early, late = Share("early"), Share("late")
    for i in range(50):
        queue.push(ScheduledTask(f"early-{i}", None, early))
    for _ in range(20):
        queue.pop()
    for i in range(10):
        queue.push(ScheduledTask(f"late-{i}", None, late))
    picked = []
    for _ in range(10):
        picked.append(queue.pop().share.tenant)
    assert picked.count("late") == 5, picked


@pytest.mark.parametrize("stage,size", STAGES)
def test_a_preempted_task_resumes_to_the_reference_image(cascade, references, stage, size):  # noqa: F811
    """A batch-class task is running alone (batch size 1) when an interactive task arrives: it is sent back
    to wait at a step boundary, the interactive task runs to its end, then the first resumes where it
    stopped. Both images equal the reference's."""
    scheduler = StageScheduler(max_batch_size=1)
    executor = StageExecutor(cascade.stages[stage])
    scheduler.submit("batch", _stage_request(cascade, stage, size, 0, references[0], "batch"), BATCH)
    outputs, finished, preempted, step = {}, [], [], 0
    while scheduler.has_work:
        if step == 2:
            request = _stage_request(cascade, stage, size, 1, references[1], "interactive")
            scheduler.submit("interactive", request, INTERACTIVE)
        report = iterate(scheduler, executor)
        assert not report.failed
        preempted += [task.request_id for task in report.preempted]
        for task, output in report.finished:
            outputs[task.request_id] = output
            finished.append(task.request_id)
        step += 1
    assert preempted == ["batch"] and finished == ["interactive", "batch"]
    for request_id, case in (("batch", 0), ("interactive", 1)):
        assert _max_diff(outputs[request_id].image, references[case][0][size]) <= 1e-4, request_id
    steps = CASES[0].model_dump()[f"{stage}_steps"]
    assert outputs["batch"].steps == steps  # no step lost or repeated across the pause


class _PriorityProbe:
    """The real stage engine, noting the OS priority its thread runs each batched call at."""

    def __init__(self, engine):
        self.engine = engine
        self.seen: list[int] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def predict(self, tasks):
        self.seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return self.engine.predict(tasks)


def test_on_a_shared_cpu_batch_only_steps_run_at_the_lowest_os_priority(cascade, embeddings):
    if not can_switch():
        pytest.skip("this machine may not raise a thread's priority back (needs root, CAP_SYS_NICE or RLIMIT_NICE)")
    probe = _PriorityProbe(cascade.stages["stage1"])
    loop = StageLoop(probe, StageScheduler(max_batch_size=2), os_priority=True).start()
    base = os.getpriority(os.PRIO_PROCESS, 0)

    async def run(request_id: str, share: Share) -> list[int]:
        probe.seen.clear()
        await loop.run(request_id, work_order("stage1", 1, 2, embeddings), share)
        return list(probe.seen)

    try:
        assert asyncio.run(run("batch", BATCH)) == [LOWEST, LOWEST]
        assert asyncio.run(run("interactive", INTERACTIVE)) == [base, base]
    finally:
        loop.stop()
