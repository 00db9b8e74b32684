"""`ifserve profile`: what each stage of a family costs on the hardware at hand, as data a planner reads.

For the text encoder and every stage, against batch size and torch threads (on a GPU: one GPU):
- one batched denoising step (tasks that never finish, so every timed call is a full step),
- what a task costs once: admitting it and finishing it (a latent stage's VAE decode, IF's stage III
  output), and delivering a final image of the stage's size as a PNG (what the server does per image),
- on a CPU, the batch-1 step again while every other core steps the same stage (`loaded`),
- on a GPU, accelerator memory: the activations of a step (its peak above what was allocated before it)
  apart from the resident weights, by batch, and of one task's finish (IF's stage III: the VAE decode);
  every stage's weights in bytes, as loaded (float16 T5 keeps its float32 `wo` layers).

The numbers are means of at least `repeats` timed calls after one warm-up, on the real engines
(stages/engine.py) loaded from a checkpoint folder, or with `random_weights` built in memory on the
device from a preset (stages/random_weights.py: no folder, nothing on disk), so a profile of random
weights costs what the real ones cost. No Ray. `benchmarks/gpu/probe.py` writes this schema too, with
every invariance mode's step times (`step_s_by_invariance`).
"""

from __future__ import annotations

import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from stages.encoding import PipelineTextEncoder
from stages.family import TEXT_TO_IMAGE, ModelFamily
from stages.images import png_bytes, to_pil

PROMPTS = ["a photo of a kangaroo", "a red bicycle", "an astronaut riding a horse", "a bowl of ramen"]


class Hardware(BaseModel):
    device: str  # "cpu" or "cuda"
    name: str  # the CPU model or the GPU's name
    cores: int  # CPU cores this process may use
    accelerators: int = 0  # GPUs on the machine (one is profiled)
    accelerator_memory_bytes: int = 0  # of one GPU
    memory_bytes: int = 0  # the machine's RAM
    torch: str = ""

    @property
    def label(self) -> str:
        return f"{self.accelerators} x {self.name}" if self.accelerators else f"{self.cores}-core {self.name}"


class StageProfile(BaseModel):
    """One stage (or the text encoder, as a one-step stage), every time in seconds."""

    output_size: int = 0  # pixels per side of what it produces (0: the encoder's embeddings)
    # step_s[threads][batch]: one batched step; on a GPU threads is "1" (one GPU)
    step_s: dict[int, dict[int, float]]
    admit_s: dict[int, float] = Field(default_factory=dict)  # per task, by threads
    finish_s: dict[int, float] = Field(default_factory=dict)  # per task, by threads
    deliver_s: dict[int, float] = Field(default_factory=dict)  # PNG of a final image of this size, by threads
    # GPU only, by batch: what a replica of this stage needs at the step's peak (weights_bytes +
    # activation_bytes), and the step's activations alone (its peak above what was allocated before it).
    peak_memory_bytes: dict[int, int] = Field(default_factory=dict)
    activation_bytes: dict[int, int] = Field(default_factory=dict)
    weights_bytes: int = 0  # parameters and buffers as loaded (dtype and float32-kept modules included)
    # GPU only: one task's finish (a latent stage's VAE decode): its activations, and weights plus them.
    finish_activation_bytes: int = 0
    finish_peak_bytes: int = 0
    # Step time by invariance mode ("split", "per_task", "off") and batch, where they were measured;
    # `step_s` is the profile's own mode (`Profile.invariance`).
    step_s_by_invariance: dict[str, dict[int, float]] = Field(default_factory=dict)
    # CPU: a step's time with every other core busy over its time alone, by threads (batch 1). Cores
    # share caches, memory bandwidth and clock boost, so a full machine steps slower than an idle one.
    loaded: dict[int, float] = Field(default_factory=dict)

    def slowdown(self, threads: int) -> float:
        return self.loaded.get(threads, 1.0)

    def image_s(self, steps: int, batch: int, threads: int, final: bool = False) -> float:
        """Seconds of one replica's time one image costs here, its batch full: its share of `steps`
        batched steps plus its own admit and finish (and the PNG when this stage makes the final image)."""
        once = self.admit_s.get(threads, 0.0) + self.finish_s.get(threads, 0.0)
        return steps * self.step_s[threads][batch] / batch + once + (self.deliver_s.get(threads, 0.0) if final else 0.0)


class Profile(BaseModel):
    hardware: Hardware
    family: str
    preset: str | None = None
    dtype: str = "float32"
    batch_invariant: bool = True
    invariance: str | None = None  # the mode `step_s` was measured in ("split", "per_task", "off"), if named
    random_weights: bool = False  # built in memory from the preset rather than loaded from a folder
    created: str = ""
    command: str = ""  # what made it
    encoder: StageProfile
    stages: dict[str, StageProfile]

    @property
    def on_gpu(self) -> bool:
        return self.hardware.device != "cpu"

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.model_validate_json(Path(path).read_text())


def hardware(device: str) -> Hardware:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return Hardware(
            device="cuda",
            name=props.name,
            cores=cores,
            accelerators=torch.cuda.device_count(),
            accelerator_memory_bytes=props.total_memory,
            memory_bytes=ram,
            torch=torch.__version__,
        )
    return Hardware(device="cpu", name=_cpu_name(), cores=cores, memory_bytes=ram, torch=torch.__version__)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass
class _Timed:
    call: Callable[[], Any]
    threads: int = 1
    before: Callable[[], None] = lambda: None  # untimed, e.g. wake the processes that load the other cores
    after: Callable[[], None] = lambda: None


def _interleaved(calls: dict[Any, _Timed], repeats: int, sync: Callable[[], None], min_s: float = 0.5) -> dict:
    """The mean time of each call, measured in rounds that run every call once, in alternating order,
    so that drift in the machine's speed (a 2-core cloud box has plenty) hits all of them alike. At least
    `repeats` rounds after a warm-up one, and more until every call has taken `min_s` in all (at most 10x
    `repeats` rounds): a cheap step needs more samples than an expensive one to get past the noise."""
    keys = list(calls)
    times: dict[Any, list[float]] = {key: [] for key in keys}
    threads = torch.get_num_threads()
    rounds = 0
    while rounds <= repeats or (min(map(sum, times.values())) < min_s and rounds <= 10 * repeats):
        for key in keys if rounds % 2 else keys[::-1]:
            timed = calls[key]
            torch.set_num_threads(timed.threads)
            timed.before()
            start = time.perf_counter()
            timed.call()
            sync()
            elapsed = time.perf_counter() - start
            timed.after()
            if rounds:  # round 0 warms up
                times[key].append(elapsed)
        rounds += 1
    torch.set_num_threads(threads)
    # The mean, not the median: a request's time is the sum of its steps, and on a shared box the slow
    # outliers are part of what a sum pays (medians made served requests look ~15 % dearer than planned).
    return {key: statistics.fmean(values) for key, values in times.items()}


class BusyCores:
    """`n` other processes, each stepping the same stage at batch 1 on one thread while resumed: a full
    machine as a served stage sees it (shared caches, memory bandwidth, all-core clocks)."""

    def __init__(self, n: int, what: list[str]):
        command = [sys.executable, "-m", "stages.profiling", "burn", *what]
        self.burners = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) for _ in range(n)]
        for burner in self.burners:
            if burner.stdout.readline().strip() != b"ready":
                self.close()
                raise RuntimeError(f"a profiling load process failed to start: {' '.join(command)}")
        self.pause()

    def resume(self, n: int | None = None) -> None:
        for burner in self.burners[:n]:
            burner.send_signal(signal.SIGCONT)
        time.sleep(0.02)  # let them get onto their cores

    def pause(self) -> None:
        for burner in self.burners:
            burner.send_signal(signal.SIGSTOP)

    def close(self) -> None:
        for burner in self.burners:
            burner.kill()
            burner.wait()


def burn(family_name: str, root: str, dtype: str, stage: str) -> None:
    """A `BusyCores` process: one endless task of `stage` stepped forever on one thread."""
    from stages.families import get_family

    torch.set_num_threads(1)
    family, torch_dtype = get_family(family_name), getattr(torch, dtype)
    if root.startswith(RANDOM):
        preset, _, seed = root.removeprefix(RANDOM).rpartition(":")
        work = Work.random(family, preset, 1, seed=int(seed), torch_dtype=torch_dtype)
    else:
        work = Work.load(family, root, 1, torch_dtype=torch_dtype)
    for spec, engine, _, endless in work.stages():
        if spec.name == stage:
            with torch.inference_mode():
                tasks = engine.admit(endless(1))
                engine.step(tasks)
                print("ready", flush=True)
                while True:
                    engine.step(tasks)
                    if tasks[0].done:
                        tasks = engine.admit(endless(1))


def module_bytes(pipe: Any) -> int:
    """Bytes of every parameter and buffer of a pipeline's models."""
    total = 0
    for component in getattr(pipe, "components", {}).values():
        if isinstance(component, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in (*component.parameters(), *component.buffers()))
    return total


def activation_bytes(call: Callable[[], Any]) -> int:
    """Bytes of accelerator memory `call` needs above what was allocated before it (its activations and
    workspaces; what it leaves allocated is included). CUDA only."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    call()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before)


def profile_family(
    family: ModelFamily,
    root: str | Path | None,
    *,
    device: str = "cpu",
    torch_dtype: torch.dtype = torch.float32,
    batch_invariant: bool | str = True,
    batch_sizes: list[int] = (1, 2, 4),
    threads: list[int] = (1,),
    repeats: int = 3,
    preset: str | None = None,
    command: str = "",
    progress: Callable[[str], None] = lambda line: None,
    random_weights: bool = False,
    seed: int = 0,
) -> Profile:
    """With `random_weights`, `preset`'s models are built in memory on `device` in `torch_dtype` (random,
    seeded by `seed`) instead of loaded from `root`, which is then unused."""
    gpu = device.startswith("cuda")
    dtype = str(torch_dtype).removeprefix("torch.")
    if random_weights and not preset:
        raise ValueError("random weights: name the preset to build")
    timer = _Timer(
        hardware(device),
        sorted({1, *batch_sizes}),  # batch 1 is every comparison's base
        [1] if gpu else sorted(set(threads)),
        repeats,
        burner=[family.name, f"{RANDOM}{preset}:{seed}" if random_weights else str(root), dtype],
    )
    progress("text encoder")
    kw = dict(device=device, torch_dtype=torch_dtype, batch_invariant=batch_invariant)
    if random_weights:
        work = Work.random(family, preset, max(timer.batch_sizes), seed=seed, **kw)
    else:
        work = Work.load(family, root, max(timer.batch_sizes), **kw)
    encoder_profile = timer.encoder(work.encoder, work.prompts)
    stages: dict[str, StageProfile] = {}
    for spec, engine, orders, endless in work.stages():
        progress(f"{spec.name} ({spec.output_size} px)")
        stages[spec.name] = timer.stage(spec.name, engine, orders, endless)
        stages[spec.name].output_size = spec.output_size
    invariance = batch_invariant if isinstance(batch_invariant, str) else ("split" if batch_invariant else "off")
    if len(timer.threads) == 1:  # one GPU (or one thread count): the step times are this mode's
        for p in (encoder_profile, *stages.values()):
            p.step_s_by_invariance = {invariance: dict(p.step_s[timer.threads[0]])}
    return Profile(
        hardware=timer.hardware,
        family=family.name,
        preset=preset,
        dtype=dtype,
        batch_invariant=invariance != "off",
        invariance=invariance,
        random_weights=random_weights,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        encoder=encoder_profile,
        stages=stages,
    )


RANDOM = "random:"  # a burner's "root" that means: build PRESET:SEED's random weights, as the profile did


class Work:
    """Real work orders for every stage: the encoder's embeddings of a few prompts, and for each later
    stage the previous stage's output (one step per stage gets there fastest). The engines come from a
    checkpoint folder (`load`) or from random weights built in memory (`random`)."""

    def __init__(self, family: ModelFamily, encoder: Any, engine: Callable[[str], Any], n: int):
        self.family = family
        self.encoder = encoder
        self.engine = engine  # stage name -> its engine
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        self.embeddings = self.encoder.encode(self.prompts)

    @classmethod
    def load(cls, family: ModelFamily, root: str | Path, n: int, **kw: Any) -> Work:
        return cls(family, family.load_encoder_from(root, **kw), lambda name: family.load_stage(name, root, **kw), n)

    @classmethod
    def random(cls, family: ModelFamily, preset: str, n: int, *, seed: int = 0, device: str = "cpu", **kw: Any) -> Work:
        from stages.random_weights import build_random

        built = build_random(family, preset, device=device, seed=seed, **kw)
        return cls(family, built.encoder, built.stages.__getitem__, n)

    def stages(self) -> Iterator[tuple[Any, Any, Callable[[int], list], Callable[[int], list]]]:
        """(spec, engine, orders, endless) per stage, in order: `orders(n)` makes n one-step work orders,
        `endless(n)` n whose steps outlast any timing."""
        for spec, engine, make in self.stage_makers():
            yield spec, engine, lambda n, make=make: make(n, 1), lambda n, make=make: make(n, ENDLESS_STEPS)

    def stage_makers(self) -> Iterator[tuple[Any, Any, Callable[..., list]]]:
        """(spec, engine, make) per stage, in order: `make(n, steps, **fields)` makes n work orders of
        `steps` steps (or of steps[i] for task i), task i with prompt i's embeddings (and text) and seed i;
        `fields` are more request fields."""
        family = self.family
        params = family.kind(TEXT_TO_IMAGE).params
        previous = None
        for spec in family.stages:

            def make(n: int, steps: int | list[int], spec=spec, previous=previous, **fields: Any) -> list:
                orders = []
                for i in range(n):
                    k = steps[i] if isinstance(steps, list) else steps
                    request = params.parse(
                        prompt=self.prompts[i % len(self.prompts)],
                        seed=i,
                        **{f"{s.name}_steps": k for s in family.stages},
                        **fields,
                    )
                    embeddings = self.embeddings[i % len(self.embeddings)]
                    orders.append(
                        family.stage_request(
                            spec, f"{spec.name}-{i}", request, embeddings=embeddings, previous=previous
                        )
                    )
                return orders

            engine = self.engine(spec.name)
            yield spec, engine, make
            previous = engine.finish(_finished_task(engine, make(1, 1)))


class _Timer:
    """Times the calls of one stage or encoder over every (threads, batch) of the profile."""

    def __init__(self, hw: Hardware, batch_sizes: list[int], threads: list[int], repeats: int, burner: list[str]):
        self.hardware = hw
        self.burner = burner  # family, checkpoints, dtype: what `BusyCores` processes load
        self.batch_sizes = batch_sizes
        self.threads = threads
        self.repeats = repeats
        self.gpu = hw.device != "cpu"
        self.sync = torch.cuda.synchronize if self.gpu else (lambda: None)

    def __call__(self, calls: dict[Any, _Timed], min_s: float = 0.5) -> dict:
        with torch.inference_mode():
            return _interleaved(calls, self.repeats, self.sync, min_s)

    def encoder(self, encoder: Any, prompts: list[str]) -> StageProfile:
        calls = {
            (t, b): _Timed(lambda b=b: encoder.encode(prompts[:b]), t) for t in self.threads for b in self.batch_sizes
        }
        timed = self(calls)
        profile = StageProfile(
            step_s={t: {b: timed[t, b] for b in self.batch_sizes} for t in self.threads},
            weights_bytes=module_bytes(encoder.pipe) if isinstance(encoder, PipelineTextEncoder) else 0,
        )
        if self.gpu:
            with torch.inference_mode():
                for b in self.batch_sizes:
                    profile.activation_bytes[b] = activation_bytes(lambda b=b: encoder.encode(prompts[:b]))
                    profile.peak_memory_bytes[b] = profile.weights_bytes + profile.activation_bytes[b]
        return profile

    def stage(
        self, name: str, engine: Any, orders: Callable[[int], list], endless: Callable[[int], list]
    ) -> StageProfile:
        """`orders(n)`: n one-step work orders; `endless(n)`: n whose steps outlast the timing. Every
        (threads, batch) point is timed in the same interleaved rounds, so they compare fairly."""
        batches = {b: engine.admit(endless(b)) for b in self.batch_sizes}
        finished = _finished_task(engine, orders(1))
        image = engine.finish(finished).image
        calls: dict[Any, _Timed] = {}
        once: dict[Any, _Timed] = {}  # what a task costs once: timed apart, since most of it is cheap
        for t in self.threads:
            calls.update({(t, b): _Timed(lambda tasks=tasks: engine.step(tasks), t) for b, tasks in batches.items()})
            once.update(
                {
                    ("admit", t): _Timed(lambda: engine.admit(orders(1)), t),
                    ("finish", t): _Timed(lambda: engine.finish(finished), t),
                    ("deliver", t): _Timed(lambda: png_bytes(to_pil(image)), t),
                }
            )
        cores = self.hardware.cores
        busy = None if self.gpu or cores < 2 else BusyCores(cores - 1, [*self.burner, name])
        if busy is not None:
            # The same step on a full machine: the other cores run the stage too (at t = cores, one other
            # process: what a replica with every core's threads meets when any other replica is busy).
            for t in self.threads:
                n = max(1, cores - t)
                calls["loaded", t] = _Timed(lambda: engine.step(batches[1]), t, lambda n=n: busy.resume(n), busy.pause)
        try:
            timed = self(calls) | self(once, min_s=0.0)
        finally:
            if busy is not None:
                busy.close()
        profile = StageProfile(
            step_s={t: {b: timed[t, b] for b in batches} for t in self.threads},
            admit_s={t: timed["admit", t] for t in self.threads},
            finish_s={t: timed["finish", t] for t in self.threads},
            deliver_s={t: timed["deliver", t] for t in self.threads},
            loaded={t: timed["loaded", t] / timed[t, 1] for t in self.threads if ("loaded", t) in timed},
            weights_bytes=module_bytes(engine.pipe),
        )
        if self.gpu:
            with torch.inference_mode():
                for b, tasks in batches.items():
                    profile.activation_bytes[b] = activation_bytes(lambda tasks=tasks: engine.step(tasks))
                    profile.peak_memory_bytes[b] = profile.weights_bytes + profile.activation_bytes[b]
                profile.finish_activation_bytes = activation_bytes(lambda: engine.finish(finished))
                profile.finish_peak_bytes = profile.weights_bytes + profile.finish_activation_bytes
        return profile


ENDLESS_STEPS = 500  # more steps than any timing takes, so that no timed step finishes a task


def _finished_task(engine: Any, orders: list) -> Any:
    (task,) = engine.admit(orders)
    while not task.done:
        engine.step([task])
    return task


if __name__ == "__main__" and sys.argv[1:2] == ["burn"]:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    burn(*sys.argv[2:6])
