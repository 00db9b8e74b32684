"""The prepared GPU probe (issue 27): one short, time-boxed run that measures the cascade on the machine at
hand and needs nothing but torch, diffusers, transformers, accelerate, sentencepiece (and pydantic and
protobuf, which `probe.sh` installs from `benchmarks/gpu/wheels/` when they are missing) and this
repository's `stages` package: no Ray, no serving stack, no checkpoint on disk.

    benchmarks/gpu/probe.sh [--device cuda|cpu] [--preset full|small|tiny] [--out DIR] [--budget-s N]

1. Builds the preset's models with random weights directly on the device, in float16 on a GPU
   (stages/random_weights.py; T5 keeps its float32 `wo` layers, as loading keeps them), and wraps them
   as the serving engines, plus the seed's reference pipelines over the same models.
2. Whether batch invariance holds bit for bit on this device: for each invariance mode ("split",
   "per_task", "off") and the text encoder and every stage, four tasks (other prompts, seeds and step
   counts) stepped once together against each stepped alone.
3. Per stage and the encoder, for each mode and batch size: one step's time, and on a GPU its
   activations (peak above what was allocated before it) apart from the resident weights; once per
   stage: admitting and finishing a task (stage III's finish is the VAE decode, whose peak is recorded)
   and a PNG of its output.
4. The in-process cascade (`Cascade.generate_many`) at the default steps (100/50/75 for IF's full
   preset; fewer on tiny and small, as the summary says) against the seed's pipeline code
   (stages/reference.py, one request after another, every model on the device), in images per second,
   and how far their images are apart.

Every part is time-boxed within `--budget-s` (counted from the wrapper's start): what did not fit is
listed in the summary's `skipped`, never silently dropped. Outputs in `--out`: `profile.json` (the
`stages.profiling.Profile` schema, `ifserve plan --profile` reads it), `summary.json` and `summary.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

# The run's start: the wrapper's (so Python's start and any wheel install count), else this import's.
T0 = float(os.environ.get("PROBE_T0") or 0) or time.time()

MODES = ("split", "per_task", "off")
ENCODER = "text_encoder"
# What the probe must run without: the serving stack and the test suite.
FORBIDDEN = ("ray", "serve", "sqlalchemy", "fastapi", "starlette", "uvicorn", "alembic", "psycopg", "openai", "tests")
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "sentencepiece",
    "tokenizers",
    "safetensors",
    "numpy",
    "pillow",
    "pydantic",
    "protobuf",
)
# On a CPU the probe checks the code path the GPU run takes, within a couple of minutes: one timed call per
# point, no warm-up (its numbers are rough; `ifserve profile` measures a CPU properly).
CPU_REPEATS = {"repeats": 1, "max_repeats": 1, "min_s": 0.0, "warmup": False}
SAFETY = 1.3  # estimates are multiplied by this before they are held against the time left
MIB = 1 << 20
GIB = 1 << 30


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/gpu/probe.sh", description="Measure the cascade on this machine (see benchmarks/gpu/probe.py)"
    )
    parser.add_argument("--device", default="cuda", help="cuda (one GPU, cuda:N for another) or cpu")
    parser.add_argument("--preset", default="full", choices=["full", "small", "tiny"])
    parser.add_argument("--out", type=Path, default=Path("out/probe"), help="where the outputs go")
    parser.add_argument("--budget-s", type=float, help="wall-clock budget in s (default 450 on a GPU, 100 on a CPU)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="default float16 on a GPU")
    parser.add_argument("--batch-sizes", type=_ints, help="default 1,2,4,8,16 on a GPU, 1,2,4 on a CPU")
    parser.add_argument("--modes", default=",".join(MODES), help="invariance modes to measure")
    parser.add_argument("--steps", type=_ints, help="the cascade's steps per stage (default: the family's defaults)")
    parser.add_argument("--cascade-images", type=int, help="images in the cascade run (default: what fits)")
    parser.add_argument("--reference-images", type=int, help="images the reference makes (default: what fits, <= 2)")
    parser.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if not gpu and args.device != "cpu":
        parser.error(f"--device: cuda, cuda:N or cpu, got {args.device!r}")
    args.gpu = gpu
    args.budget_s = args.budget_s or (450.0 if gpu else 100.0)
    args.dtype = args.dtype or ("float16" if gpu else "float32")
    args.batch_sizes = sorted(set(args.batch_sizes or ([1, 2, 4, 8, 16] if gpu else [1, 2, 4])))
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes: some of {', '.join(MODES)}, got {args.modes}")
    return args


def log(message: str) -> None:
    print(f"[probe {time.time() - T0:6.1f} s] {message}", file=sys.stderr, flush=True)


class Clock:
    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.end = T0 + budget_s

    def left(self) -> float:
        return self.end - time.time()

    def elapsed(self) -> float:
        return time.time() - T0

    def share(self, fraction: float) -> float:
        """A deadline: `fraction` of the time left from now."""
        return time.time() + max(0.0, self.left()) * fraction


class Device:
    def __init__(self, name: str):
        import torch

        self.name = name
        self.gpu = name.startswith("cuda")
        self.torch = torch
        if self.gpu:
            torch.cuda.set_device(torch.device(name))  # what memory_allocated and the peaks count

    def sync(self) -> None:
        if self.gpu:
            self.torch.cuda.synchronize()

    def activation(self, call: Callable[[], Any]) -> int | None:
        """Bytes `call` needs above what was allocated before it (GPU; None on a CPU, not measured)."""
        if not self.gpu:
            return None
        from stages.profiling import activation_bytes

        return activation_bytes(call)

    def clear(self) -> None:
        if self.gpu:
            self.torch.cuda.empty_cache()


def timed(
    call: Callable[[], Any],
    sync: Callable[[], None],
    *,
    repeats: int,
    max_repeats: int,
    min_s: float,
    warmup: bool = True,
) -> dict:
    """One warm-up call (unless not `warmup`), then at least `repeats` timed ones (more, up to
    `max_repeats`, until they took `min_s` together)."""
    warm = None
    if warmup:
        start = time.perf_counter()
        call()
        sync()
        warm = time.perf_counter() - start
    n = max(repeats, min(max_repeats, math.ceil(min_s / max(warm or min_s, 1e-6))))
    times = []
    for _ in range(n):
        start = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - start)
    return {"s": statistics.fmean(times), "repeats": n, "warmup_s": warm, "min_s": min(times), "max_s": max(times)}


# ---- invariance modes: the engines' `invariance`, or the older `batch_invariant` ---------------------


def set_mode(engine: Any, mode: str) -> bool:
    """Put an engine (or the text encoder) in `mode`; False where it has only the older on/off switch
    (then "per_task" is run here, one call per task)."""
    if hasattr(engine, "invariance"):
        engine.invariance = mode
        return True
    engine.batch_invariant = mode != "off"
    return False


def stepper(engine: Any, mode: str) -> Callable[[list], None]:
    if set_mode(engine, mode) or mode != "per_task":
        return engine.step

    def per_task(tasks: list) -> None:
        for task in tasks:
            engine.step([task])

    return per_task


def encoding(encoder: Any, mode: str, prompts: list[str]) -> Callable[[], list]:
    if set_mode(encoder, mode) or mode != "per_task":
        return lambda: encoder.encode(prompts)
    return lambda: [e for p in prompts for e in encoder.encode([p])]


# ---- the probe ----------------------------------------------------------------------------------------


class Probe:
    def __init__(self, args: argparse.Namespace, command: str):
        import torch

        self.args = args
        self.command = command
        self.clock = Clock(args.budget_s)
        self.device = Device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.out: Path = args.out
        self.skipped: list[str] = []
        self.errors: list[str] = []
        self.parts: dict[str, dict] = {}
        self.summary: dict[str, Any] = {}
        self.built = None
        self.work = None
        self.components: list[dict] = []  # name, spec (None: encoder), engine, make
        self.sweep: dict[str, dict[str, dict[int, dict]]] = {}
        self.once: dict[str, dict] = {}
        self.invariance: dict[str, Any] = {}
        self.cascade: dict[str, Any] = {}
        self.native_modes = True

    # -- bookkeeping
    def skip(self, what: str) -> None:
        log(f"skipped: {what}")
        self.skipped.append(what)

    def part(self, name: str, run: Callable[[], None]) -> None:
        start = time.time()
        log(f"{name} ...")
        try:
            run()
            status = "done"
        except Exception as err:  # noqa: BLE001 - the probe reports every failure and goes on
            status = "failed"
            self.errors.append(f"{name}: {type(err).__name__}: {err}")
            log(f"{name} failed:\n{traceback.format_exc()}")
            self.device.clear()
        self.parts[name] = {"s": round(time.time() - start, 2), "status": status}
        self.write()

    # -- 1. build
    def build(self) -> None:
        from stages.families import DEEPFLOYD_IF
        from stages.profiling import Work
        from stages.random_weights import build_random

        torch = self.device.torch
        self.family = DEEPFLOYD_IF
        self.built = build_random(
            self.family,
            self.args.preset,
            device=self.args.device,
            torch_dtype=self.dtype,
            seed=self.args.seed,
            progress=log,
        )
        n = max(4, *self.args.batch_sizes)
        with torch.inference_mode():
            self.work = Work(self.family, self.built.encoder, self.built.stages.__getitem__, n)
            self.components = [{"name": ENCODER, "spec": None, "engine": self.built.encoder, "make": None}]
            for spec, engine, make in self.work.stage_makers():
                self.components.append({"name": spec.name, "spec": spec, "engine": engine, "make": make})
        self.native_modes = all(hasattr(c["engine"], "invariance") for c in self.components)
        if not self.native_modes:
            self.skip("the engines have no `invariance` yet: per_task is run here, one call per task")

    # -- 2. invariance, bit for bit
    def check_invariance(self, deadline: float) -> None:
        torch = self.device.torch
        results: dict[str, dict[str, dict]] = {mode: {} for mode in self.args.modes}
        n = 4
        with torch.inference_mode():
            # "per_task" last: with one call per task it is the likeliest to hold.
            for mode in sorted(self.args.modes, key=lambda m: m == "per_task"):
                for c in self.components:
                    if time.time() > deadline:
                        self.skip(f"invariance check {c['name']} {mode}: out of its share of the budget")
                        continue
                    try:
                        results[mode][c["name"]] = self._check(c, mode, n)
                    except torch.cuda.OutOfMemoryError as err:
                        results[mode][c["name"]] = {"error": f"out of memory: {err}"}
                        self.device.clear()
        # True / False where every component was checked, None where some were not.
        holds = {
            mode: all(r.get("equal") for r in by.values()) if len(by) == len(self.components) else None
            for mode, by in results.items()
        }
        self.invariance = {"tasks": n, "native_modes": self.native_modes, "modes": results, "holds": holds}

    def _check(self, c: dict, mode: str, n: int) -> dict:
        engine = c["engine"]
        if c["spec"] is None:
            prompts = self.work.prompts[:n]
            together = encoding(engine, mode, prompts)()
            alone = [engine.encode([p])[0] for p in prompts]
            pairs = [(t.prompt_embeds, a.prompt_embeds) for t, a in zip(together, alone, strict=True)]
            pairs += [(t.negative_embeds, a.negative_embeds) for t, a in zip(together, alone, strict=True)]
        else:
            orders = c["make"](n, [2 + i for i in range(n)])  # other prompts, seeds and step counts
            set_mode(engine, mode)
            tasks = engine.admit(orders)
            stepper(engine, mode)(tasks)
            pairs = []
            for task, order in zip(tasks, orders, strict=True):
                (single,) = engine.admit([order])
                engine.step([single])
                pairs.append((task.sample, single.sample))
        return compare(pairs)

    # -- 3. step time and memory against batch size, each mode
    def measure_once(self, deadline: float) -> None:
        from stages.profiling import module_bytes

        torch = self.device.torch
        with torch.inference_mode():
            for c in self.components:
                engine = c["engine"]
                entry: dict[str, Any] = {"weights_bytes": module_bytes(engine.pipe)}
                self.once[c["name"]] = entry
                if c["spec"] is None or time.time() > deadline:
                    if c["spec"] is not None:
                        self.skip(f"admit/finish/deliver of {c['name']}: out of its share of the budget")
                    continue
                set_mode(engine, "split" if "split" in self.args.modes else self.args.modes[0])
                entry.update(self._once(engine, c["make"]))

    def _once(self, engine: Any, make: Callable[..., list]) -> dict:
        from stages.images import png_bytes, to_pil
        from stages.profiling import _finished_task

        sync = self.device.sync
        finished = _finished_task(engine, make(1, 1))
        image = engine.finish(finished).image
        # On a CPU (a check of the code path, not a measurement) one call each, without a warm-up.
        quick = dict(repeats=2, max_repeats=2, min_s=0.0) if self.device.gpu else dict(CPU_REPEATS)
        return {
            "admit_s": timed(lambda: engine.admit(make(1, 1)), sync, **quick)["s"],
            "finish_s": timed(lambda: engine.finish(finished), sync, **quick)["s"],
            "deliver_s": timed(lambda: png_bytes(to_pil(image)), lambda: None, **quick)["s"],
            "finish_activation_bytes": self.device.activation(lambda: engine.finish(finished)),
        }

    def measure_steps(self, deadline: float) -> None:
        torch = self.device.torch
        gpu = self.device.gpu
        repeats = dict(repeats=3, max_repeats=10, min_s=0.3) if gpu else dict(CPU_REPEATS)
        self.sweep = {c["name"]: {mode: {} for mode in self.args.modes} for c in self.components}
        stopped: set[tuple[str, str]] = set()
        with torch.inference_mode():
            # Batch sizes outermost: when time runs short every stage and mode has its small batches.
            for b in self.args.batch_sizes:
                for c in self.components:
                    for mode in self.args.modes:
                        name = c["name"]
                        if (name, mode) in stopped:
                            continue
                        estimate = predict(self.sweep[name][mode], b)
                        need = estimate * (repeats["repeats"] + (2 if gpu else 0))
                        if time.time() + need > deadline:
                            stopped.add((name, mode))
                            left = max(0.0, deadline - time.time())
                            self.skip(
                                f"step sweep {name} {mode} batch {b} and up: ~{need:.0f} s needed, {left:.0f} s left"
                            )
                            continue
                        try:
                            self.sweep[name][mode][b] = self._measure(c, mode, b, repeats)
                        except torch.cuda.OutOfMemoryError as err:
                            stopped.add((name, mode))
                            self.sweep[name][mode][b] = {"error": f"out of memory: {str(err)[:200]}"}
                            self.skip(f"step sweep {name} {mode} batch {b} and up: out of memory")
                            self.device.clear()
                self.write()

    def _measure(self, c: dict, mode: str, b: int, repeats: dict) -> dict:
        engine = c["engine"]
        if c["spec"] is None:
            call = encoding(engine, mode, self.work.prompts[:b])
        else:
            set_mode(engine, mode)
            tasks = engine.admit(c["make"](b, _endless()))
            step = stepper(engine, mode)

            def call(tasks=tasks, step=step):
                step(tasks)

        result = timed(call, self.device.sync, **repeats)
        activation = self.device.activation(call)
        return {
            "step_s": result["s"],
            "per_image_s": result["s"] / b,
            "repeats": result["repeats"],
            "warmup_s": result["warmup_s"],
            "activation_bytes": activation,
        }

    # -- 4. the cascade against the reference
    def compare_cascade(self) -> None:
        """The reference's first image first: its measured time calibrates the estimates (from the step
        sweep) that size the cascade's run to what is left of the budget."""
        import torch

        from stages.family import TEXT_TO_IMAGE
        from stages.profiling import PROMPTS

        family = self.family
        kind = family.kind(TEXT_TO_IMAGE).params
        defaults = kind.parse(prompt="a default request")
        default_steps = {spec.name: defaults.stage(spec.name).steps for spec in family.stages}
        if self.args.steps:
            if len(self.args.steps) != len(family.stages):
                raise ValueError(f"--steps: one per stage ({len(family.stages)}), got {self.args.steps}")
            steps = dict(zip(default_steps, self.args.steps, strict=True))
        elif self.args.preset == "full":
            steps = dict(default_steps)
        else:  # a quick look (tiny, small): 2 steps a stage, so that a CPU run fits its budget
            steps = dict.fromkeys(default_steps, 2)
        fields = {} if steps == default_steps else {f"{name}_steps": k for name, k in steps.items()}
        mode = "split" if "split" in self.args.modes else self.args.modes[0]
        largest = max(self.args.batch_sizes)
        self.cascade = {
            "steps": steps,
            "default_steps": steps == default_steps,
            "family_default_steps": default_steps,
            "size": defaults.size,
            "by_mode": {},
        }

        def left() -> float:
            return self.clock.left() - reserve(self.clock)

        # One reference image, if the sweep's numbers say it fits.
        base = "off" if "off" in self.args.modes else mode
        guess = self.estimate(steps, mode=base, batch=1, images=1)
        self.cascade["estimate_reference_image_s"] = guess
        if guess is not None and guess * SAFETY > left():
            self.skip(f"cascade vs reference: one reference image ~{guess:.0f} s, {left():.0f} s left")
            return
        requests = [kind.parse(prompt=PROMPTS[i % len(PROMPTS)], seed=i, **fields) for i in range(max(8, largest))]
        reference_times: list[float] = []
        reference_images: list[dict] = []
        try:
            self._reference(requests[0], reference_times, reference_images)
        except Exception as err:  # noqa: BLE001 - the cascade is still worth measuring
            self.errors.append(f"reference: {type(err).__name__}: {err}")
            log(f"the reference failed:\n{traceback.format_exc()}")
            self.device.clear()
        calibrate = reference_times[0] / guess if guess and reference_times else 1.0
        self.cascade["calibration"] = calibrate

        def cascade_s(m: str, n: int) -> float | None:
            estimate = self.estimate(steps, mode=m, batch=min(n, largest), images=n)
            return None if estimate is None else estimate * calibrate

        candidates = [self.args.cascade_images] if self.args.cascade_images else [8, 4, 2, 1]
        candidates = [n for n in candidates if n <= len(requests)]
        fits = [n for n in candidates if (cascade_s(mode, n) or math.inf) * SAFETY <= left()]
        if not fits and not self.args.cascade_images:
            self.skip(f"the cascade in mode {mode}: not even one image fits ({left():.0f} s left)")
            self._reference_summary(reference_times)
            return
        n_images = fits[0] if fits else candidates[0]
        max_batch = min(n_images, largest)
        self.cascade.update(images=n_images, max_batch_size=max_batch, estimate_cascade_s=cascade_s(mode, n_images))
        with torch.inference_mode():
            results = {mode: self._run_cascade(mode, requests[:n_images], max_batch)}
        # A second reference image where it fits (the first ran cold: the mean of two is fairer).
        wanted = self.args.reference_images or 2
        while reference_times and len(reference_times) < min(wanted, n_images):
            if statistics.fmean(reference_times) * SAFETY > left():
                self.skip(f"reference image {len(reference_times) + 1}: {left():.0f} s left")
                break
            self._reference(requests[len(reference_times)], reference_times, reference_images)
        self._reference_summary(reference_times)
        # Then the other modes, as far as the budget goes.
        for other in [m for m in ("off", "per_task") if m in self.args.modes and m != mode]:
            estimate = cascade_s(other, n_images)
            if estimate is None or estimate * SAFETY > left():
                self.skip(f"cascade in mode {other}: ~{estimate or math.nan:.0f} s, {left():.0f} s left")
                continue
            with torch.inference_mode():
                results[other] = self._run_cascade(other, requests[:n_images], max_batch)
        for m, images in results.items():
            self._against_reference(m, images, reference_images)

    def _reference(self, request: Any, times: list[float], images: list[dict]) -> None:
        """One request through the seed's code (its generator on the CPU, as there)."""
        from stages.reference import reference_cascade

        start = time.perf_counter()
        out, _ = reference_cascade(self.built.reference, request)
        self.device.sync()
        times.append(time.perf_counter() - start)
        images.append({size: t.detach().float().cpu() for size, t in out.items()})
        log(f"reference image {len(times)}: {times[-1]:.1f} s")

    def _reference_summary(self, times: list[float]) -> None:
        if not times:
            return
        self.cascade["reference"] = {
            "images": len(times),
            "seconds": sum(times),
            "per_image_s": times,
            "images_per_s": len(times) / sum(times),
            "how": "stages/reference.py (the seed's pipeline calls), one request at a time, every model on the device",
        }

    def _run_cascade(self, mode: str, requests: list, max_batch: int) -> list:
        for c in self.components:
            set_mode(c["engine"], mode)
        cascade = self.built.cascade()
        start = time.perf_counter()
        results = cascade.generate_many(requests, max_batch_size=max_batch)
        self.device.sync()
        seconds = time.perf_counter() - start
        errors = [f"{type(r.error).__name__}: {r.error}" for r in results if r.error is not None]
        self.cascade["by_mode"][mode] = {
            "seconds": seconds,
            "images_per_s": len(requests) / seconds,
            "errors": errors,
        }
        log(f"cascade {mode}: {len(requests)} images in {seconds:.1f} s")
        return results

    def _against_reference(self, mode: str, results: list, reference_images: list[dict]) -> None:
        entry = self.cascade["by_mode"][mode]
        reference = self.cascade.get("reference")
        if reference is None:
            return
        entry["vs_reference"] = entry["images_per_s"] / reference["images_per_s"]
        diffs: dict[int, float] = {}
        for result, images in zip(results, reference_images, strict=False):
            for size, expected in images.items():
                got = result.tensors.get(size)
                if got is not None:
                    diff = compare([(got.detach().float().cpu(), expected)])["max_abs_diff"]
                    diffs[size] = max(diffs.get(size, 0.0), diff)
        entry["max_abs_diff_vs_reference"] = diffs

    def estimate(self, steps: dict[str, int], *, mode: str, batch: int, images: int) -> float | None:
        """Seconds for `images` requests through the cascade at `batch`, from the measured steps."""
        total = 0.0
        rounds = math.ceil(images / batch)
        for c in self.components:
            measured = self.sweep.get(c["name"], {}).get(mode) or {}
            step = step_at(measured, batch)
            if step is None:
                return None
            if c["spec"] is None:
                total += rounds * step
                continue
            once = self.once.get(c["name"], {})
            total += steps[c["name"]] * rounds * step + images * (once.get("admit_s", 0.0) + once.get("finish_s", 0.0))
        return total

    # -- outputs
    def profile(self):
        from stages.profiling import Profile, StageProfile, hardware

        threads = 1 if self.device.gpu else self.device.torch.get_num_threads()
        own = "split" if "split" in self.args.modes else self.args.modes[0]

        def stage_profile(c: dict) -> StageProfile:
            name = c["name"]
            once = self.once.get(name, {})
            by_mode = {
                mode: {b: r["step_s"] for b, r in rows.items() if "step_s" in r}
                for mode, rows in self.sweep.get(name, {}).items()
            }
            activation = {b: r["activation_bytes"] for b, r in self.sweep.get(name, {}).get(own, {}).items()
                          if r.get("activation_bytes") is not None}  # fmt: skip
            weights = once.get("weights_bytes", 0)
            finish_act = once.get("finish_activation_bytes") or 0
            return StageProfile(
                output_size=c["spec"].output_size if c["spec"] else 0,
                step_s={threads: by_mode.get(own, {})},
                admit_s={threads: once["admit_s"]} if "admit_s" in once else {},
                finish_s={threads: once["finish_s"]} if "finish_s" in once else {},
                deliver_s={threads: once["deliver_s"]} if "deliver_s" in once else {},
                activation_bytes=activation,
                peak_memory_bytes={b: weights + a for b, a in activation.items()},
                weights_bytes=weights,
                finish_activation_bytes=finish_act,
                finish_peak_bytes=weights + finish_act if finish_act else 0,
                step_s_by_invariance=by_mode,
            )

        if not self.components:
            return None
        return Profile(
            hardware=hardware(self.args.device),
            family=self.family.name,
            preset=self.args.preset,
            dtype=self.args.dtype,
            batch_invariant=own != "off",
            invariance=own,
            random_weights=True,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            command=self.command,
            encoder=stage_profile(self.components[0]),
            stages={c["name"]: stage_profile(c) for c in self.components[1:]},
        )

    def environment(self) -> dict:
        from stages.profiling import _cpu_name

        torch = self.device.torch
        env: dict[str, Any] = {
            "device": self.args.device,
            "cpu": {
                "model": _cpu_name(),
                "cores": len(os.sched_getaffinity(0)),
                "torch_threads": torch.get_num_threads(),
            },
            "python": platform.python_version(),
            "platform": platform.platform(),
            "versions": {name: _version(name) for name in PACKAGES},
        }
        if self.device.gpu:
            index = torch.device(self.args.device).index or 0
            props = torch.cuda.get_device_properties(index)
            env["gpu"] = {
                "name": props.name,
                "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}",
                "count": torch.cuda.device_count(),
                "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version(),
                "cudnn_benchmark": torch.backends.cudnn.benchmark,
            }
            env["device_name"] = props.name
        else:
            env["device_name"] = env["cpu"]["model"]
        return env

    def memory(self) -> dict:
        if not self.device.gpu:
            return {}
        torch = self.device.torch
        return {
            "allocated_bytes": torch.cuda.memory_allocated(),
            "reserved_bytes": torch.cuda.memory_reserved(),
            "weights_bytes": {c["name"]: self.once.get(c["name"], {}).get("weights_bytes") for c in self.components},
        }

    def write(self, final: bool = False) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        summary = {
            "command": self.command,
            "complete": final,
            "family": getattr(getattr(self, "family", None), "name", None),
            "preset": self.args.preset,
            "dtype": self.args.dtype,
            "batch_sizes": self.args.batch_sizes,
            "modes": self.args.modes,
            "budget_s": self.args.budget_s,
            "elapsed_s": round(self.clock.elapsed(), 2),
            **self.summary,
            "parts": self.parts,
            "build_s": round(self.built.build_s, 2) if self.built else None,
            "memory": self.memory() if self.components else {},
            "stages": {
                c["name"]: {
                    **self.once.get(c["name"], {}),
                    "modes": self.sweep.get(c["name"], {}),
                    "vectorised": vectorised(c["engine"]),
                }
                for c in self.components
            },
            "invariance": self.invariance,
            "cascade": self.cascade,
            "skipped": self.skipped,
            "errors": self.errors,
            "imports": imports_check(),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        if final:
            profile = self.profile()
            if profile is not None:
                profile.save(self.out / "profile.json")
            (self.out / "summary.md").write_text(markdown(summary))

    def run(self) -> int:
        self.summary["environment"] = self.environment()
        self.part("build", self.build)
        if self.built is None:
            self.write(final=True)
            return 1
        self.part("invariance", lambda: self.check_invariance(self.clock.share(0.2)))
        self.part("once", lambda: self.measure_once(self.clock.share(0.08)))
        self.part("steps", lambda: self.measure_steps(self.clock.share(0.5)))
        self.part("cascade", self.compare_cascade)
        self.summary["elapsed_s"] = round(self.clock.elapsed(), 2)
        self.write(final=True)
        log(f"wrote {self.out}/summary.json, summary.md, profile.json in {self.clock.elapsed():.0f} s")
        return 1 if self.errors else 0


def reserve(clock: Clock) -> float:
    """Seconds kept back for the outputs and the unexpected."""
    return max(3.0, 0.03 * clock.budget_s)


def _endless() -> int:
    from stages.profiling import ENDLESS_STEPS

    return ENDLESS_STEPS


def predict(measured: dict[int, dict], b: int) -> float:
    """A step's time at batch `b` from the largest smaller batch measured (linear: the worst case)."""
    known = [(k, r["step_s"]) for k, r in measured.items() if k < b and "step_s" in r]
    if not known:
        return 0.0
    k, s = max(known)
    return s * b / k


def step_at(measured: dict[int, dict], b: int) -> float | None:
    if b in measured and "step_s" in measured[b]:
        return measured[b]["step_s"]
    known = [(k, r["step_s"]) for k, r in measured.items() if "step_s" in r]
    if not known:
        return None
    k, s = max(known) if max(known)[0] < b else min(known)
    return s * b / k


def compare(pairs: list) -> dict:
    """Bit-for-bit equality of each pair, and the largest absolute difference where both are finite."""
    import torch

    equal = True
    diff = 0.0
    nonfinite = 0
    for a, b in pairs:
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.shape != b.shape or a.dtype != b.dtype:
            return {"equal": False, "max_abs_diff": float("inf"), "nonfinite": 0, "note": "shapes or dtypes differ"}
        equal = equal and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
        a, b = a.double(), b.double()
        finite = torch.isfinite(a) & torch.isfinite(b)
        nonfinite += int((~finite).sum())
        if finite.any():
            diff = max(diff, float((a - b).abs()[finite].max()))
    return {"equal": bool(equal), "max_abs_diff": diff, "nonfinite": nonfinite}


def vectorised(engine: Any) -> dict[str, Any]:
    """Whether the engine's batched guidance and scheduler step gave the per-task bits on this device
    (stages/engine.py checks its first of each, per device and dtype), and how many batched steps ran."""
    checked = {" ".join(map(str, key)): same for key, same in getattr(engine, "_vectorised", {}).items()}
    return {"checked": checked, "batched_steps": getattr(engine, "batched_steps", None)}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def imports_check() -> dict:
    """What this process imported that the probe must run without (the serving stack, the tests, the
    other benchmarks)."""
    modules = sorted(sys.modules)
    forbidden = sorted({m.split(".")[0] for m in modules if m.split(".")[0] in FORBIDDEN})
    forbidden += sorted(m for m in modules if m.startswith("benchmarks.") and not m.startswith("benchmarks.gpu"))
    project = sorted({".".join(m.split(".")[:2]) for m in modules if m.split(".")[0] in ("stages", "benchmarks")})
    return {"forbidden": forbidden, "ok": not forbidden, "project_modules": project}


# ---- summary.md --------------------------------------------------------------------------------------


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.1f}"


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:,.1f}"


def markdown(s: dict) -> str:
    env = s.get("environment", {})
    versions = env.get("versions", {})
    lines = [
        f"# GPU probe: {s.get('family')} {s['preset']} ({s['dtype']}) on {env.get('device_name', '?')}",
        "",
        f"`{s['command']}`",
        "",
        f"torch {versions.get('torch')}, diffusers {versions.get('diffusers')}, transformers "
        f"{versions.get('transformers')}; CPU {env.get('cpu', {}).get('model')} "
        f"({env.get('cpu', {}).get('cores')} cores); {s['elapsed_s']:.0f} s of a {s['budget_s']:.0f} s budget; "
        f"random weights built on the device in {s.get('build_s') or 0:.1f} s.",
        "",
    ]
    batches = s["batch_sizes"]
    lines += [
        "## Step time, ms (per image), by invariance mode and batch",
        "",
        "| stage | mode | " + " | ".join(f"b={b}" for b in batches) + " |",
        "|---|---|" + "---|" * len(batches),
    ]
    for name, stage in s["stages"].items():
        for mode, rows in stage.get("modes", {}).items():
            cells = []
            for b in batches:
                r = rows.get(b) or rows.get(str(b)) or {}
                cells.append(f"{_ms(r['step_s'])} ({_ms(r['per_image_s'])})" if "step_s" in r else r.get("error", "-"))
            lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    gpu = bool(s.get("memory"))
    lines += ["", "## Memory, MiB: weights, and activations above them (split)", ""]
    if gpu:
        lines += [
            "| stage | weights | " + " | ".join(f"b={b}" for b in batches) + " | finish (decode) |",
            "|---|---|" + "---|" * (len(batches) + 1),
        ]
        for name, stage in s["stages"].items():
            rows = stage.get("modes", {}).get("split", {})
            cells = [_mib((rows.get(b) or rows.get(str(b)) or {}).get("activation_bytes")) for b in batches]
            lines.append(
                f"| {name} | {_mib(stage.get('weights_bytes'))} | "
                + " | ".join(cells)
                + f" | {_mib(stage.get('finish_activation_bytes'))} |"
            )
        lines.append(f"\nResident after the run: {_mib(s['memory'].get('allocated_bytes'))} MiB allocated.")
    else:
        weights = ", ".join(f"{n} {_mib(st.get('weights_bytes'))}" for n, st in s["stages"].items())
        lines.append(f"Not measured on a CPU. Weights: {weights}.")
    inv = s.get("invariance") or {}
    lines += ["", "## Batch invariance on this device (4 tasks together vs each alone, one step)", ""]
    if inv:
        names = list(s["stages"])
        lines += ["| mode | " + " | ".join(names) + " | holds |", "|---|" + "---|" * (len(names) + 1)]
        for mode, by in inv.get("modes", {}).items():
            cells = []
            for n in names:
                r = by.get(n, {})
                cells.append("-" if "equal" not in r else ("equal" if r["equal"] else f"{r['max_abs_diff']:.2e}"))
            holds = {True: "yes", False: "no"}.get(inv["holds"].get(mode), "not fully checked")
            lines.append(f"| {mode} | " + " | ".join(cells) + f" | {holds} |")
    checks = {n: st.get("vectorised", {}).get("checked") for n, st in s["stages"].items()}
    checks = {
        n: ", ".join(f"{k}: {'same bits' if v else 'DIFFERS, task by task'}" for k, v in c.items())
        for n, c in checks.items()
        if c
    }
    lines += ["", "Batched guidance and scheduler step against each task's own (stages/engine.py's first-use check):"]
    lines += [f"- {n}: {text}" for n, text in checks.items()] or ["- not exercised"]
    c = s.get("cascade") or {}
    lines += ["", "## Cascade (in process) against the seed's pipeline code", ""]
    if c.get("by_mode"):
        steps = "/".join(str(k) for k in c["steps"].values())
        note = "the defaults" if c.get("default_steps") else "fewer than the defaults, to fit the budget"
        ref = c.get("reference") or {"images": 0, "images_per_s": math.nan}
        lines += [
            f"{c['images']} images of {c['size']} px at {steps} steps ({note}), max batch {c['max_batch_size']}; "
            f"reference: {ref['images']} image(s), {ref['images_per_s']:.4f} images/s.",
            "",
            "| mode | images/s | x reference | max abs diff vs reference (final image) |",
            "|---|---|---|---|",
        ]
        for mode, r in c["by_mode"].items():
            diffs = r.get("max_abs_diff_vs_reference", {})
            final = diffs.get(c["size"], diffs.get(str(c["size"])))
            lines.append(
                f"| {mode} | {r['images_per_s']:.4f} | {r.get('vs_reference', 0):.2f} | "
                f"{'-' if final is None else f'{final:.2e}'} |"
            )
    else:
        lines.append("Not run (see skipped).")
    lines += ["", "## Skipped and errors", ""]
    lines += [f"- skipped: {x}" for x in s["skipped"]] + [f"- error: {x}" for x in s["errors"]] or ["- none"]
    imports = s.get("imports", {})
    lines += ["", f"Imports: {'no serving stack, no tests' if imports.get('ok') else imports.get('forbidden')}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    command = os.environ.get("PROBE_COMMAND") or " ".join(
        shlex.quote(a) for a in [sys.executable, "-m", "benchmarks.gpu.probe", *(argv or sys.argv[1:])]
    )
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    probe = Probe(args, command)
    log(f"{command}: budget {args.budget_s:.0f} s, {args.preset} in {args.dtype} on {args.device}")
    return probe.run()


if __name__ == "__main__":
    sys.exit(main())
