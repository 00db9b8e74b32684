"""The step loop's host work: one batched scheduler step for many tasks, bit for bit each task's own
`scheduler.step`; no read of a tensor's value on the host inside a step; outputs leave on the host."""

from __future__ import annotations

import copy
import functools
import pickle
import subprocess
import sys
import threading

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch.overrides import TorchFunctionMode

from stages.batched_step import StepTask, batched_step, previous_timesteps, supports
from stages.executor import StageExecutor
from stages.families.deepfloyd_if import GenerationParams
from stages.scheduler import StageScheduler
from stages.stage_loop import StageLoop
from tests.stepping import iterate, stage_request

IF_I = {"beta_schedule": "squaredcos_cap_v2", "variance_type": "learned_range", "thresholding": True}
SCHEDULERS = {
    # What the families step with (IF's stages I and II, the x4 upscaler, DeciDiffusion) ...
    "if-stage1": (DDPMScheduler, {**IF_I, "sample_max_value": 1.5, "dynamic_thresholding_ratio": 0.95}),
    "if-stage2": (DDPMScheduler, {**IF_I, "sample_max_value": 1.0, "dynamic_thresholding_ratio": 0.95}),
    "x4-upscaler": (
        DDIMScheduler,
        {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "clip_sample": False, "steps_offset": 1},
    ),
    "decidiffusion": (
        DDIMScheduler,
        {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    ),
    # ... and the other variance types and predictions the batched step implements.
    "ddpm-fixed-small": (DDPMScheduler, {"variance_type": "fixed_small", "clip_sample": True}),
    "ddpm-fixed-small-log": (DDPMScheduler, {"variance_type": "fixed_small_log", "prediction_type": "v_prediction"}),
    "ddpm-fixed-large": (DDPMScheduler, {"variance_type": "fixed_large", "prediction_type": "sample"}),
    "ddim-epsilon": (DDIMScheduler, {"clip_sample": True, "set_alpha_to_one": True}),
    "ddim-sample": (DDIMScheduler, {"prediction_type": "sample", "thresholding": True}),
}


def _tasks(cls, config: dict, seed: int, n: int = 6) -> list[tuple[StepTask, object]]:
    """n tasks at different step counts and positions (the first at its last step, t = 0 for DDPM),
    each with the per-task reference: a copy of its scheduler and generator stepped by diffusers."""
    base = cls(**config)
    g = torch.Generator().manual_seed(seed)
    learned = config.get("variance_type") == "learned_range"
    out = []
    for i in range(n):
        scheduler = copy.deepcopy(base)
        steps = [1, 3, 27, 50, 100, 7][i % 6]
        scheduler.set_timesteps(steps)
        timesteps = [int(t) for t in scheduler.timesteps.tolist()]
        index = len(timesteps) - 1 if i == 0 else int(torch.randint(len(timesteps), (1,), generator=g))
        sample = torch.randn(1, 3, 16, 16, generator=g) * 1.7
        model_output = torch.randn(1, 6 if learned else 3, 16, 16, generator=g)
        generator = torch.Generator().manual_seed(1000 * seed + i)
        task = StepTask(
            scheduler,
            timesteps[index],
            previous_timesteps(scheduler, timesteps)[index],
            sample,
            model_output,
            generator,
        )
        out.append((task, scheduler.timesteps[index]))
    return out


def _reference(task: StepTask, timestep) -> tuple[torch.Tensor, torch.Tensor]:
    """The task's own step, as the pipelines make it, on copies: (next sample, generator state after)."""
    generator = torch.Generator()
    generator.set_state(task.generator.get_state())
    scheduler = copy.deepcopy(task.scheduler)
    extra = {"eta": 0.0} if isinstance(scheduler, DDIMScheduler) else {}
    sample = scheduler.step(task.model_output, timestep, task.sample, generator=generator, return_dict=False, **extra)[
        0
    ]
    return sample, generator.get_state()


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_batched_step_equals_each_tasks_own_step_bit_for_bit(name, seed):
    cls, config = SCHEDULERS[name]
    pairs = _tasks(cls, config, seed)
    references = [_reference(task, timestep) for task, timestep in pairs]
    tasks = [task for task, _ in pairs]
    assert supports(tasks)
    samples = batched_step(tasks)
    for i, (task, (sample, state)) in enumerate(zip(tasks, references, strict=True)):
        assert torch.equal(samples[i : i + 1], sample), (name, i)
        # The same draws from the task's generator (none at t = 0): the next stage continues from it.
        assert torch.equal(task.generator.get_state(), state), (name, i)


def test_the_predecessors_are_those_the_scheduler_finds():
    """Custom timesteps and a strength's suffix: `previous_timesteps` agrees with diffusers' own."""
    scheduler = DDPMScheduler(**IF_I)
    scheduler.set_timesteps(timesteps=[999, 800, 777, 400, 13, 0])
    timesteps = [int(t) for t in scheduler.timesteps.tolist()]
    assert previous_timesteps(scheduler, timesteps[2:]) == [int(scheduler.previous_timestep(t)) for t in timesteps[2:]]


def test_tasks_whose_scalars_live_elsewhere_or_in_half_precision_on_a_cpu_step_alone():
    """An edit's scheduler holds its alphas on the device after `add_noise`, and its own step then
    computes with device scalars; a CPU multiplies half-precision tensors by a scalar's unrounded value.
    Neither is stepped as one with the others."""
    pairs = _tasks(*SCHEDULERS["if-stage1"], seed=0, n=3)
    tasks = [task for task, _ in pairs]
    assert supports(tasks)
    moved = copy.deepcopy(tasks[1].scheduler)
    moved.alphas_cumprod = moved.alphas_cumprod.to("meta")
    assert not supports(
        [
            tasks[0],
            StepTask(moved, *(getattr(tasks[1], f) for f in ("t", "prev_t", "sample", "model_output", "generator"))),
        ]
    )
    half = [StepTask(t.scheduler, t.t, t.prev_t, t.sample.half(), t.model_output.half(), t.generator) for t in tasks]
    assert not supports(half)


def test_a_half_precision_cpu_stage_guides_task_by_task():
    """The guidance check uses scales float16 cannot hold: on a CPU, half precision differs row by row."""
    from stages.engine import _guidance_both_ways, _same_bits

    assert _same_bits(*_guidance_both_ways(torch.zeros(1)))
    assert not _same_bits(*_guidance_both_ways(torch.zeros(1, dtype=torch.float16)))


def test_a_scheduler_it_does_not_know_is_stepped_task_by_task():
    from diffusers import EulerDiscreteScheduler

    class MyDDPM(DDPMScheduler):  # a subclass may step differently
        pass

    for scheduler in (EulerDiscreteScheduler(), MyDDPM()):
        scheduler.set_timesteps(4)
        assert previous_timesteps(scheduler, scheduler.timesteps.tolist()) is None or type(scheduler) is MyDDPM
        task = StepTask(scheduler, 1, 0, torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.Generator())
        assert not supports([task, task])


class HostReads(TorchFunctionMode):
    """Counts every read of a tensor's value by the host (what waits for the device on a GPU) and every
    diffusers scheduler step, whatever the device."""

    READS = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.Tensor.numpy,
    }

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def _requests(cascade, n: int, steps: int = 3):
    requests = []
    for i in range(n):
        params = GenerationParams(prompt=f"prompt {i}", seed=i, stage1_steps=steps + i, stage1_guidance=7.0 - i)
        emb = cascade.text_encoder.encode([params.prompt])[0]
        requests.append(stage_request("stage1", str(i), params, seed=params.seed, embeddings=emb))
    return requests


@pytest.mark.parametrize("invariance", ["split", "per_task", "off"])
def test_a_step_of_four_tasks_reads_nothing_on_the_host_and_steps_their_schedulers_once(
    cascade, monkeypatch, invariance
):
    engine = cascade.stages["stage1"]
    calls = {"step": 0}
    original = DDPMScheduler.step

    @functools.wraps(original)  # the pipelines read its signature to pass the generator
    def counted(self, *args, **kwargs):
        calls["step"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DDPMScheduler, "step", counted)
    previous, engine.invariance = engine.invariance, invariance
    try:
        engine.step(engine.admit(_requests(cascade, 2)))  # the first batched step checks itself, once
        checked = dict(engine._vectorised)
        assert checked == {
            ("guidance", "cpu", torch.float32): True,
            ("scheduler step", "cpu", torch.float32, "scalars on cpu"): True,
        }
        tasks = engine.admit(_requests(cascade, 4))
        batched, calls["step"] = engine.batched_steps, 0
        with HostReads() as hooks:
            engine.step(tasks)
        assert hooks.reads == 0
        assert calls["step"] == 0 and engine.batched_steps == batched + 1
        # The per-task path it replaced reads the device several times per task (the measure works).
        with HostReads() as hooks:
            for task, output in zip(tasks, engine.predict(tasks), strict=True):
                engine.advance(task, output)
        assert hooks.reads >= 3 * len(tasks) and calls["step"] == 4
    finally:
        engine.invariance = previous


@pytest.mark.parametrize("invariance", ["split", "per_task"])
def test_each_mode_that_promises_invariance_keeps_it(cascade, invariance):
    """Four tasks stepped together to the end equal each stepped alone, bit for bit."""
    engine = cascade.stages["stage1"]
    previous, engine.invariance = engine.invariance, invariance
    try:
        together = engine.run(_requests(cascade, 4, steps=2))
        alone = [engine.run([request])[0] for request in _requests(cascade, 4, steps=2)]
    finally:
        engine.invariance = previous
    for a, b in zip(together, alone, strict=True):
        assert torch.equal(a.image, b.image) and torch.equal(a.generator_state, b.generator_state)


def test_per_task_mode_gives_each_task_its_own_call(cascade):
    engine = cascade.stages["stage1"]
    previous, engine.invariance = engine.invariance, "per_task"
    try:
        tasks = engine.admit(_requests(cascade, 3))
        before = engine.unet_calls
        engine.step(tasks)
    finally:
        engine.invariance = previous
    assert engine.unet_calls - before == 3


def test_outputs_leave_on_the_host_and_load_where_there_is_no_gpu(cascade, tmp_path):
    """What a replica hands back (a stage's output, the encoder's embeddings) is on the CPU, so a
    consumer with no GPU (the ingress on the head) can unpickle it: checked in a process that sees none."""
    engine = cascade.stages["stage1"]
    embeddings = cascade.text_encoder.encode(["a kangaroo"])[0]
    (output,) = engine.run(_requests(cascade, 1, steps=1))
    for tensor in (output.image, output.generator_state, embeddings.prompt_embeds, embeddings.negative_embeds):
        assert tensor.device.type == "cpu"
    path = tmp_path / "result.pkl"
    path.write_bytes(pickle.dumps((output, embeddings)))
    code = (
        "import pickle, sys, torch; assert not torch.cuda.is_available();"
        f"o, e = pickle.loads(open({str(path)!r}, 'rb').read());"
        "print(tuple(o.image.shape), o.image.device, e.prompt_embeds.device)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env={"CUDA_VISIBLE_DEVICES": "", "PATH": ""}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "cpu cpu" in done.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none on this machine")
def test_a_cuda_stage_hands_back_host_tensors(tiny_checkpoints):
    from stages.cascade import Cascade

    cuda = Cascade.from_checkpoints(tiny_checkpoints, device="cuda")
    embeddings = cuda.text_encoder.encode(["a kangaroo"])[0]
    params = GenerationParams(prompt="a kangaroo", seed=3, stage1_steps=2)
    request = stage_request("stage1", "0", params, seed=3, embeddings=embeddings)
    (output,) = cuda.stages["stage1"].run([request])
    assert embeddings.prompt_embeds.device.type == "cpu" and output.image.device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none on this machine")
@pytest.mark.parametrize("name", sorted(SCHEDULERS) if torch.cuda.is_available() else ["every scheduler"])
def test_the_batched_step_equals_each_tasks_own_step_on_cuda(name):
    cls, config = SCHEDULERS[name]
    for dtype in (torch.float32, torch.float16):
        pairs = _tasks(cls, config, 0)
        for task, _ in pairs:
            task.sample, task.model_output = task.sample.cuda().to(dtype), task.model_output.cuda().to(dtype)
        references = [_reference(task, timestep) for task, timestep in pairs]
        samples = batched_step([task for task, _ in pairs])
        for i, (sample, _) in enumerate(references):
            assert torch.equal(samples[i : i + 1], sample), (name, dtype, i)


def test_a_threaded_loop_finishes_tasks_beside_the_step(cascade):
    """A stage loop on its own thread makes outputs (stage III: the VAE decode) on its finisher thread."""
    engine = cascade.stages["stage1"]
    threads: list[str] = []
    finish = engine.finish

    def recorded(task):
        threads.append(threading.current_thread().name)
        return finish(task)

    engine.finish = recorded
    loop = StageLoop(engine, StageScheduler(4)).start()
    try:
        import asyncio

        async def main():
            return await asyncio.gather(*(loop.run(r.request_id, r) for r in _requests(cascade, 3, steps=1)))

        results = asyncio.run(main())
    finally:
        loop.stop()
        del engine.finish
    assert len(results) == 3 and all(r[0].image.shape[0] == 1 for r in results)
    assert threads and all(name.startswith("stage1-finish") for name in threads)


def test_a_vectorised_part_that_differs_on_a_device_is_run_task_by_task_from_then_on(cascade, monkeypatch):
    """The first batched step on a device checks itself against the per-task steps: a difference (as a
    kernel on a GPU might make) and the stage steps task by task, with the reference's results."""
    engine = cascade.stages["stage1"]
    expected = [engine.run([r])[0] for r in _requests(cascade, 3, steps=2)]

    def off_by_a_bit(*args, **kwargs):
        return torch.nextafter(batched_step(*args, **kwargs), torch.tensor(float("inf")))

    monkeypatch.setattr("stages.engine.batched_step", off_by_a_bit)
    monkeypatch.setattr(engine, "_vectorised", {})
    together = engine.run(_requests(cascade, 3, steps=2))
    assert engine._vectorised[("scheduler step", "cpu", torch.float32, "scalars on cpu")] is False
    for a, b in zip(together, expected, strict=True):
        assert torch.equal(a.image, b.image)


def test_a_failing_batched_step_fails_only_its_task(cascade, monkeypatch):
    """A raise in the batched step takes its draws back; each task then steps alone, as it would have."""
    engine = cascade.stages["stage1"]
    requests = _requests(cascade, 3, steps=1)
    expected = [engine.run([r])[0] for r in _requests(cascade, 3, steps=1)]

    def broken(*args, **kwargs):
        batched_step(*args, **kwargs)  # the draws are made, then it fails
        raise RuntimeError("injected")

    monkeypatch.setattr("stages.engine.batched_step", broken)
    scheduler, executor = StageScheduler(max_batch_size=4), StageExecutor(engine)
    for request in requests:
        scheduler.submit(request.request_id, request)
    finished = []
    while scheduler.has_work:
        report = iterate(scheduler, executor)
        assert not report.failed
        finished += report.finished
    assert len(finished) == 3
    for (_, output), alone in zip(sorted(finished, key=lambda f: f[0].request_id), expected, strict=True):
        assert torch.equal(output.image, alone.image)


def test_a_final_image_in_eight_bits_is_the_picture_the_reference_makes():
    """What a final stage hands the ingress (uint8) becomes the very picture `pt_to_pil` makes of the
    float image, edges and the half-way values included."""
    from stages.images import to_pil, to_uint8

    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, 32, 32, generator=g) * 1.2
    image[0, 0, 0, :5] = torch.tensor([-1.0, 1.0, 0.0, 2 * (0.5 / 255) - 1, 2 * (128.5 / 255) - 1])
    eight = to_uint8(image)
    assert eight.dtype == torch.uint8 and eight.shape == image.shape
    assert list(to_pil(eight).getdata()) == list(to_pil(image).getdata())


CUDA_CASES = [(d, m) for d in (torch.float32, torch.float16) for m in ("split", "per_task", "off")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none on this machine")
@pytest.mark.parametrize("dtype,invariance", CUDA_CASES if torch.cuda.is_available() else [(None, "every mode")])
def test_on_cuda_each_image_in_a_batch_equals_it_alone(tiny_checkpoints, dtype, invariance):
    """The whole cascade on a GPU, four requests sharing every step against each alone: bit for bit
    where the mode promises it, within the CPU's bound for "off"."""
    from stages.cascade import Cascade

    cascade = Cascade.from_checkpoints(tiny_checkpoints, device="cuda", torch_dtype=dtype)
    for engine in (cascade.text_encoder, *cascade.stages.values()):
        engine.invariance = invariance
    params = [
        cascade.params(prompt=f"prompt {i}", seed=i, size=1024, stage1_steps=3 + i, stage2_steps=2, stage3_steps=2)
        for i in range(4)
    ]
    together = cascade.generate_many(params, max_batch_size=4)
    for request, result in zip(params, together, strict=True):
        alone = cascade.generate(request)
        for size, tensor in alone.tensors.items():
            if invariance == "off":
                assert (tensor.float() - result.tensors[size].float()).abs().max() <= 4e-3
            else:
                assert torch.equal(tensor, result.tensors[size]), (size, request.seed)
