"""Metrics overhead in the stage's hot loop (not a test): the same step loop with metrics off and on,
measured in one run, printed as a ratio; plus the cost of one step's worth of metric recordings.

    python -m benchmarks.bench_metrics [--checkpoints checkpoints/tiny] [--requests 8] [--steps 25]

It runs `StageLoop` over the first stage of the tiny preset, IF's stage I (the cheapest UNet step there
is, so the worst case for a fixed per-step cost) inside a local Ray, where `ray.serve.metrics` records as in a replica.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import ray  # noqa: E402
import torch  # noqa: E402

from serve.metrics import StageMetrics  # noqa: E402
from stages.checkpoints import write_checkpoints  # noqa: E402
from stages.fair_share import DEFAULT_SHARE  # noqa: E402
from stages.families import DEEPFLOYD_IF  # noqa: E402
from stages.scheduler import StageScheduler  # noqa: E402
from stages.stage_loop import StageLoop  # noqa: E402

FAMILY = DEEPFLOYD_IF
FIRST = FAMILY.stages[0]


async def run_loop(engine, embeddings, metrics, requests: int, steps: int) -> float:
    """Seconds per batched step for `requests` arriving together, `steps` steps each."""
    loop = StageLoop(engine, StageScheduler(max_batch_size=requests), metrics=metrics).start()
    params = FAMILY.params(prompt="x", **{f"{FIRST.name}_steps": steps})
    start = time.perf_counter()
    await asyncio.gather(
        *(
            loop.run(str(i), FAMILY.stage_request(FIRST, str(i), params, embeddings=embeddings, seed=i))
            for i in range(requests)
        )
    )
    elapsed = time.perf_counter() - start
    executed = loop.stats.steps
    loop.stop()
    return elapsed / executed


def recording_cost(metrics: StageMetrics, batch: int, repeats: int = 5000) -> float:
    """Seconds of metric calls one step makes (one step, its tasks' start and finish, a refresh)."""
    start = time.perf_counter()
    for _ in range(repeats):
        metrics.stepped(0.01, batch, 1)
        metrics.started(0.001, DEFAULT_SHARE)
        metrics.finished(0.5)
        metrics.arrived_task()
        metrics.refresh(batch, 0, batch, 1)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints/tiny"))
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=5, help="off/on pairs, interleaved")
    args = parser.parse_args()

    if not args.checkpoints.is_dir() or not any(args.checkpoints.iterdir()):
        write_checkpoints(FAMILY, "tiny", args.checkpoints)
    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=os.cpu_count())
    torch.set_num_threads(os.cpu_count() or 1)
    engine = FAMILY.load_stage(FIRST.name, args.checkpoints)
    embeddings = FAMILY.load_encoder_from(args.checkpoints).encode(["a red bicycle"])[0]
    metrics = StageMetrics(FIRST.name)

    asyncio.run(run_loop(engine, embeddings, None, args.requests, 3))  # warm-up
    off, on = [], []
    for _ in range(args.rounds):
        off.append(asyncio.run(run_loop(engine, embeddings, None, args.requests, args.steps)))
        on.append(asyncio.run(run_loop(engine, embeddings, metrics, args.requests, args.steps)))
    cost = recording_cost(metrics, args.requests)
    ray.shutdown()

    step_off, step_on = statistics.median(off), statistics.median(on)
    print(
        f"\n## Stage loop with metrics off vs on (tiny {FIRST.name}, {args.requests} requests x {args.steps} steps, "
        f"median of {args.rounds})"
    )
    print("| metrics | ms per batched step | vs off |")
    print("|---|---|---|")
    print(f"| off | {step_off * 1000:.2f} | 1.000x |")
    print(f"| on | {step_on * 1000:.2f} | {step_on / step_off:.3f}x |")
    print(
        f"\nOne step's metric recordings, timed alone: {cost * 1e6:.1f} us = "
        f"{cost / step_off * 100:.2f}% of a tiny {FIRST.name} step"
    )


if __name__ == "__main__":
    main()
