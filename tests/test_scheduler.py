"""The scheduler's rules, counted in steps (never seconds), for every stage of the tiny cascade and for
the text encoder, with the real engines: the `max_batch_size` cap, request mode admitting nothing
mid-batch, and cancellation (a waiting task never runs; a running one leaves before the next step)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from stages.encoding import EncoderEngine, EncodeRequest
from stages.executor import StageExecutor
from stages.families.deepfloyd_if import GenerationParams
from stages.scheduler import FifoQueue, StageScheduler, TaskStatus
from stages.stage_loop import StageLoop
from tests.stepping import iterate, stage_request

STAGES = ["stage1", "stage2", "stage3"]


@pytest.fixture(scope="module")
def embeddings(cascade):
    return cascade.text_encoder.encode(["a red bicycle"])[0]


def engine(cascade, stage: str):
    return EncoderEngine(cascade.text_encoder) if stage == "encoder" else cascade.stages[stage]


def work_order(stage: str, i: int, steps: int, embeddings):
    """Request i of `steps` steps for `stage` (the encoder: always one step)."""
    if stage == "encoder":
        return EncodeRequest(f"prompt {i}")
    params = GenerationParams(prompt=f"prompt {i}", seed=i, **{f"{s}_steps": steps for s in STAGES})
    size = {"stage1": 64, "stage2": 256, "stage3": 1024}[stage]
    inputs = {} if stage == "stage1" else {"image": torch.rand(1, 3, size // 4, size // 4) * 2 - 1}
    return stage_request(stage, str(i), params, embeddings=embeddings, **inputs)


def run(scheduler, executor, submit: dict[int, list], cancel: dict[int, list] | None = None):
    """Iterate until idle; `submit`/`cancel`: before iteration k, these request ids. Returns the batch
    size of every iteration and every report."""
    sizes, reports, k = [], [], 0
    while k <= max([*submit, *(cancel or {})]) or scheduler.has_work:
        for request_id, request in submit.get(k, []):
            scheduler.submit(request_id, request)
        for request_id in (cancel or {}).get(k, []):
            assert scheduler.cancel(request_id)
        report = iterate(scheduler, executor)
        assert not report.failed, report.failed
        sizes.append(report.batch_size)
        reports.append(report)
        k += 1
    return sizes, reports


@pytest.mark.parametrize("stage", [*STAGES, "encoder"])
def test_no_step_holds_more_than_max_batch_size(cascade, embeddings, stage):
    steps = 1 if stage == "encoder" else 2
    requests = [(str(i), work_order(stage, i, steps, embeddings)) for i in range(5)]
    sizes, reports = run(StageScheduler(max_batch_size=2), StageExecutor(engine(cascade, stage)), {0: requests})
    assert sizes == ([2, 2, 1] if stage == "encoder" else [2, 2, 2, 2, 1, 1])
    assert sorted(t.request_id for r in reports for t, _ in r.finished) == [str(i) for i in range(5)]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("mode,expected", [("request", [1, 1, 1, 1, 1, 1]), ("step", [1, 2, 2, 1])])
def test_request_mode_admits_nothing_mid_batch(cascade, embeddings, stage, mode, expected):
    """B arrives after A's first step: request mode runs it only once A is done; step mode at once."""
    a, b = work_order(stage, 0, 3, embeddings), work_order(stage, 1, 3, embeddings)
    scheduler = StageScheduler(max_batch_size=4, mode=mode)
    sizes, _ = run(scheduler, StageExecutor(engine(cascade, stage)), {0: [("a", a)], 1: [("b", b)]})
    assert sizes == expected


@pytest.mark.parametrize("stage", [*STAGES, "encoder"])
def test_a_cancelled_waiting_task_never_runs(cascade, embeddings, stage):
    executor = StageExecutor(engine(cascade, stage))
    scheduler = StageScheduler(max_batch_size=1)
    requests = [(name, work_order(stage, i, 2, embeddings)) for i, name in enumerate("abc")]
    sizes, reports = run(scheduler, executor, {0: requests}, cancel={1: ["b"]})
    finished = [t.request_id for r in reports for t, _ in r.finished]
    cancelled = [t for r in reports for t in r.cancelled]
    assert finished == ["a", "c"] and [t.request_id for t in cancelled] == ["b"]
    assert cancelled[0].status is TaskStatus.CANCELLED and cancelled[0].steps == 0
    assert sum(sizes) == 2 * (1 if stage == "encoder" else 2)  # only a's and c's steps ran


@pytest.mark.parametrize("stage", STAGES)
def test_a_cancelled_running_task_leaves_before_the_next_step(cascade, embeddings, stage):
    executor = StageExecutor(engine(cascade, stage))
    scheduler = StageScheduler(max_batch_size=4)
    requests = [(name, work_order(stage, i, 4, embeddings)) for i, name in enumerate("ab")]
    sizes, reports = run(scheduler, executor, {0: requests}, cancel={2: ["a"]})
    assert sizes == [2, 2, 1, 1]  # a took two steps, then left; b took all four
    [cancelled] = [t for r in reports for t in r.cancelled]
    assert cancelled.request_id == "a" and cancelled.steps == 2
    assert [t.request_id for r in reports for t, _ in r.finished] == ["b"]


def test_a_cancelled_caller_cancels_its_task_in_the_loop(cascade, embeddings):
    """Through StageLoop, as a replica runs it: the caller's cancellation reaches the scheduler, the task
    leaves before the next step, and the other caller still gets its output."""
    loop = StageLoop(cascade.stages["stage1"], StageScheduler(max_batch_size=4))

    async def scenario():
        a = asyncio.create_task(loop.run("a", work_order("stage1", 0, 6, embeddings)))
        b = asyncio.create_task(loop.run("b", work_order("stage1", 1, 6, embeddings)))
        await asyncio.sleep(0)
        loop.iterate()
        a.cancel()
        await asyncio.sleep(0)
        while loop.iterate():
            await asyncio.sleep(0)
        return await b, a.cancelled()

    (output, record), a_cancelled = asyncio.run(scenario())
    assert a_cancelled and record.steps == 6 and output.steps == 6
    assert loop.stats.cancelled == 1 and loop.stats.task_steps == 2 + 5
    assert loop.stats.steps == 6


def test_the_waiting_queue_is_a_policy(cascade, embeddings):
    """A queue policy decides which waiting task goes next; the loop is unchanged."""

    class Newest(FifoQueue):
        def pop(self):
            return self._queue.pop()

    scheduler = StageScheduler(max_batch_size=1, policy=Newest())
    requests = [(name, work_order("stage1", i, 1, embeddings)) for i, name in enumerate("abc")]
    _, reports = run(scheduler, StageExecutor(cascade.stages["stage1"]), {0: requests})
    assert [t.request_id for r in reports for t, _ in r.finished] == ["c", "b", "a"]


def test_a_task_past_its_deadline_leaves_the_batch_at_the_next_step(cascade, embeddings):
    """Through StageLoop: the task whose deadline passes mid-run leaves before the next step and its caller
    gets DeadlineExceeded; its batch-mate finishes; a work order already past its deadline is refused."""
    import time

    from stages.errors import DeadlineExceeded

    loop = StageLoop(cascade.stages["stage1"], StageScheduler(max_batch_size=4))

    async def scenario():
        deadline = time.time() + 3600
        a = asyncio.create_task(loop.run("a", work_order("stage1", 0, 6, embeddings), deadline=deadline))
        b = asyncio.create_task(loop.run("b", work_order("stage1", 1, 6, embeddings)))
        await asyncio.sleep(0)
        loop.iterate()
        loop.iterate()
        loop._deadlines["a"] = time.time() - 1  # its deadline passes now
        while loop.iterate():
            await asyncio.sleep(0)
        with pytest.raises(DeadlineExceeded):
            await loop.run("c", work_order("stage1", 2, 6, embeddings), deadline=time.time() - 1)
        return await asyncio.gather(a, b, return_exceptions=True)

    (a, (output, record)) = asyncio.run(scenario())
    assert isinstance(a, DeadlineExceeded) and a.stage == "stage1"
    assert output.steps == 6 and loop.stats.task_steps == 2 + 2 + 4  # a took 2 steps, then left


def test_health_sees_a_wedged_or_dead_engine_thread(cascade, embeddings):
    """A running loop is healthy; once wedged (the fault hook) it takes no step while work waits, and
    fails its health check after the stall limit; a loop whose thread died fails at once."""
    import time

    loop = StageLoop(cascade.stages["stage1"], StageScheduler(max_batch_size=4)).start()
    try:

        async def one(request_id: str):
            return await loop.run(request_id, work_order("stage1", 0, 2, embeddings))

        asyncio.run(one("warm"))
        assert loop.health(stall_factor=10, min_stall_s=0.5) is None
        loop.wedge()
        time.sleep(0.3)

        async def stuck():
            task = asyncio.create_task(one("stuck"))
            await asyncio.sleep(1.0)
            # Factor 1: the limit is max(0.5 s, one step), under the 1.3 s it has been stuck even when a
            # loaded box makes a step slow (factor 10 could put it past the wait).
            health = loop.health(stall_factor=1, min_stall_s=0.5)
            task.cancel()
            return health

        problem = asyncio.run(stuck())
        assert problem is not None and "no step" in problem
        assert loop.stats.completed == 1  # nothing ran while wedged
    finally:
        loop.stop()
    dead = StageLoop(cascade.stages["stage1"], StageScheduler(max_batch_size=4))
    dead.abort(RuntimeError("boom"))
    assert "died" in dead.health()
