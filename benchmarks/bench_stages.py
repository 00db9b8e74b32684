"""Stage engine benchmark (not a test): prints ratios measured in one run.

1. Per-stage time of one batched denoising step against batch size (guided tasks, 2 UNet rows each),
   with batch invariance on (the default: results equal to the reference's) and off (one plain batch).
2. Throughput of N requests arriving together through the step-batched engine, against the seed's
   reference diffusers pipelines called one request at a time.

    python -m benchmarks.bench_stages --preset small --checkpoints checkpoints/small

Stages, sizes and request fields come from the family (DeepFloyd IF).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from stages.cascade import Cascade  # noqa: E402
from stages.checkpoints import write_checkpoints  # noqa: E402
from stages.families import DEEPFLOYD_IF  # noqa: E402
from stages.families.deepfloyd_if import GenerationParams  # noqa: E402

FAMILY = DEEPFLOYD_IF

PROMPTS = [
    "a photo of a kangaroo",
    "a red bicycle",
    "an astronaut riding a horse",
    "a lighthouse on a cliff",
    "a bowl of ramen",
    "a corgi puppy",
    "a steam locomotive",
    "a field of sunflowers",
]


def step_time_by_batch(cascade: Cascade, batch_sizes: list[int], repeats: int) -> None:
    """Batch invariance on and off are timed step by step, interleaved in alternating order, so drift
    hits both alike. At batch 1 both run the same code: that column's ratio is the run's noise floor."""
    print(f"\n## Step time against batch size (ms per step, median of {repeats}; per image in brackets)")
    print(
        "| stage | batch invariant | "
        + " | ".join(f"batch {b}" for b in batch_sizes)
        + " | per-image speed-up at largest |"
    )
    print("|---|---|" + "---|" * (len(batch_sizes) + 1))
    embeddings = cascade.text_encoder.encode(PROMPTS[: max(batch_sizes)])
    params = GenerationParams(prompt="x", **{f"{spec.name}_steps": 500 for spec in FAMILY.stages})
    cost = {}
    for stage_name, engine in cascade.stages.items():
        ms: dict[bool, list[float]] = {True: [], False: []}  # by batch invariance: per batch size
        for b in batch_sizes:
            tasks = engine.admit([_request(stage_name, i, params, embeddings) for i in range(b)])
            samples: dict[bool, list[float]] = {True: [], False: []}
            for round_ in range(repeats + 1):  # round 0 warms up; the order alternates (ABBA)
                for invariant in (True, False) if round_ % 2 else (False, True):
                    engine.batch_invariant = invariant
                    start = time.perf_counter()
                    engine.step(tasks)
                    if round_:
                        samples[invariant].append((time.perf_counter() - start) * 1000)
            for invariant, times in samples.items():
                ms[invariant].append(statistics.median(times))
        engine.batch_invariant = True
        for invariant in (True, False):
            row = " | ".join(f"{t:.1f} ({t / b:.1f})" for t, b in zip(ms[invariant], batch_sizes, strict=True))
            speedup = (ms[invariant][0] / batch_sizes[0]) / (ms[invariant][-1] / batch_sizes[-1])
            print(f"| {stage_name} | {'on' if invariant else 'off'} | {row} | {speedup:.2f}x |")
        cost[stage_name] = [on / off for on, off in zip(ms[True], ms[False], strict=True)]
    print(f"\nStep time with batch invariance on / off, by batch size {', '.join(map(str, batch_sizes))}:")
    for stage_name, ratios in cost.items():
        print(f"- {stage_name}: " + ", ".join(f"{r:.2f}x" for r in ratios))


def _request(stage_name: str, i: int, params: GenerationParams, embeddings):
    """Work order i for a stage; a later stage gets a random image of its predecessor's size."""
    spec = FAMILY.stage(stage_name)
    inputs = {"seed": i, "embeddings": embeddings[i]}
    position = FAMILY.stages.index(spec)
    if position:
        previous = FAMILY.stages[position - 1].output_size
        inputs["image"] = torch.rand(1, 3, previous, previous) * 2 - 1
    return FAMILY.stage_request(spec, str(i), params.model_copy(update={"prompt": PROMPTS[i]}), **inputs)


def throughput(cascade: Cascade, reference, n: int, base: GenerationParams, batch: int) -> None:
    from tests.reference import reference_cascade

    requests = [base.model_copy(update={"prompt": PROMPTS[i % len(PROMPTS)], "seed": i}) for i in range(n)]
    start = time.perf_counter()
    for p in requests:
        reference_cascade(reference, p)
    ref_s = time.perf_counter() - start
    runners = {
        ("request", True): "engine, request-level batching",
        ("step", True): "engine, step-level batching",
        ("step", False): "engine, step-level batching, batch invariance off",
    }
    results = {}
    for mode, invariant in runners:
        cascade.set_batch_invariant(invariant)
        start = time.perf_counter()
        cascade.generate_many(requests, mode=mode, max_batch_size=batch)
        results[mode, invariant] = time.perf_counter() - start
    cascade.set_batch_invariant(True)
    steps = "/".join(str(base.stage(spec.name).steps) for spec in FAMILY.stages_for(base.size))
    print(f"\n## {n} requests arriving together, size {base.size}, steps {steps}, max batch {batch}")
    print("| runner | seconds | images/min | throughput vs reference |")
    print("|---|---|---|---|")
    print(f"| reference diffusers, one request at a time | {ref_s:.1f} | {60 * n / ref_s:.1f} | 1.00x |")
    for key, label in runners.items():
        s = results[key]
        print(f"| {label} | {s:.1f} | {60 * n / s:.1f} | {ref_s / s:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--checkpoints", type=Path, help="default: checkpoints/<preset> (written if missing)")
    parser.add_argument("--batch-sizes", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("-n", "--requests", type=int, default=4)
    parser.add_argument("--size", type=int, default=FAMILY.sizes[-1], choices=FAMILY.sizes)
    parser.add_argument("--steps", default="10,4,4", help="denoising steps of each stage, in order")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.checkpoints or Path("checkpoints") / args.preset
    if not root.is_dir() or not any(root.iterdir()):
        print(f"writing the {args.preset} checkpoints to {root}")
        write_checkpoints(FAMILY, args.preset, root)
    from tests.reference import load_reference

    cascade = Cascade.from_checkpoints(root)
    print(f"# Stage engine benchmark: preset {args.preset}, {args.threads} CPU threads, torch {torch.__version__}")
    step_time_by_batch(cascade, [int(b) for b in args.batch_sizes.split(",")], args.repeats)
    steps = [int(s) for s in args.steps.split(",")]
    base = GenerationParams(
        prompt="x", size=args.size, **{f"{spec.name}_steps": n for spec, n in zip(FAMILY.stages, steps, strict=True)}
    )
    throughput(cascade, load_reference(root), args.requests, base, max(int(b) for b in args.batch_sizes.split(",")))


if __name__ == "__main__":
    main()
