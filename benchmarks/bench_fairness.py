"""Fairness under a flood: tenant A (batch class) floods the service while tenant B (interactive) sends
at a steady rate. One served application (deploy/local.yaml, the plan for this machine) and one run:

    1. capacity: A alone, a closed loop kept full -> C images/s
    2. B alone: open loop (Poisson) at `--share` x C -> B's p95 alone
    3. both: A's flood, and B as in 2 with other seeds -> B's p95 under the flood, A's images/s meanwhile

It prints two ratios, never asserting a time:

    b_p95_flood_vs_alone   B's p95 under A's flood / B's p95 alone          target <= 1.3
    a_share_of_leftover    A's images/s during 3 / (C - B's images/s in 3)   target >= 0.8 (work-conserving)

    python -m benchmarks.bench_fairness --preset tiny --json benchmarks/results/fairness-tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

from benchmarks.served import ROOT, config_name, report, served_with_tenants
from serve.loadgen import percentile, request_bodies, run_load
from stages.families import DEEPFLOYD_IF

TARGETS = {"b_p95_flood_vs_alone": ("<=", 1.3), "a_share_of_leftover": (">=", 0.8)}


def run(
    preset: str, size: int, share: float, b_requests: int, flood: int, config_path: Path, progress=print
) -> dict[str, Any]:
    fields = dict(DEEPFLOYD_IF.quick_params)
    with served_with_tenants(preset, config_path, {"flood": "batch", "steady": "interactive"}, progress) as served:
        _, url, keys = served
        measured = asyncio.run(
            _measure(url, size, fields, share, b_requests, flood, keys["flood"], keys["steady"], progress)
        )
    return measured | {"preset": preset, "size": size, "fields": fields, "config": config_name(config_path)}


async def _measure(url, size, fields, share, b_requests, flood, a_key, b_key, progress) -> dict[str, Any]:
    def bodies(n: int, seed: int) -> list[dict]:
        return request_bodies(n, size=size, fields=fields, seed=seed)

    def p95(result) -> float:
        return percentile([o.latency_s for o in result.succeeded], 0.95)

    await run_load(url, bodies(flood, 1), concurrency=flood, api_key=a_key, progress=False)  # warm every replica
    progress(f"1. capacity: tenant A alone, {flood} in flight ...")
    alone_a = await run_load(url, bodies(4 * flood, 100), concurrency=flood, keep_full=True, api_key=a_key)
    capacity = alone_a.throughput
    rate = share * capacity
    progress(f"   {60 * capacity:.1f} images/min; B will send {60 * rate:.1f}/min")
    progress(f"2. tenant B alone, {b_requests} requests at {60 * rate:.1f}/min ...")
    alone_b = await run_load(url, bodies(b_requests, 1000), rate=rate, api_key=b_key, seed=1)
    progress(f"   B's p95 alone: {p95(alone_b):.2f} s")
    progress("3. tenant B under tenant A's flood ...")
    stop = asyncio.Event()
    flood_run = asyncio.create_task(
        run_load(url, bodies(10_000, 5000), concurrency=flood, keep_full=True, api_key=a_key, stop=stop, progress=False)
    )
    await asyncio.sleep(max(5.0, 2 * flood / capacity))  # the flood fills every queue first
    window_start = time.perf_counter()
    flooded_b = await run_load(url, bodies(b_requests, 2000), rate=rate, api_key=b_key, seed=2)
    window_s = time.perf_counter() - window_start
    stop.set()
    flooded_a = await flood_run
    progress(f"   B's p95 under the flood: {p95(flooded_b):.2f} s")
    # A's completions inside B's window.
    a_done = [o for o in flooded_a.succeeded if 0 <= flooded_a.started_at + o.done_s - window_start <= window_s]
    a_rate = len(a_done) / window_s
    b_rate = len(flooded_b.succeeded) / window_s
    ratios = {
        "b_p95_flood_vs_alone": p95(flooded_b) / p95(alone_b),
        "a_share_of_leftover": a_rate / max(1e-9, capacity - b_rate),
    }
    return {
        "capacity_images_per_s": capacity,
        "b_rate_per_s": rate,
        "b_p95_alone_s": p95(alone_b),
        "b_p95_flood_s": p95(flooded_b),
        "b_failed": len(alone_b.outcomes) - len(alone_b.succeeded) + len(flooded_b.outcomes) - len(flooded_b.succeeded),
        "a_images_per_s_during_flood": a_rate,
        "b_images_per_s_during_flood": b_rate,
        "window_s": window_s,
        "ratios": ratios,
        "met": {name: _met(ratios[name], *TARGETS[name]) for name in ratios},
        "runs": {r.label or name: r.summary() for name, r in
                 (("a_alone", alone_a), ("b_alone", alone_b), ("b_flood", flooded_b), ("a_flood", flooded_a))},
    }  # fmt: skip


def _met(value: float, op: str, target: float) -> bool:
    return value <= target if op == "<=" else value >= target


def render(results: dict[str, Any]) -> str:
    lines = [
        f"fairness, {results['preset']} preset, {results['size']} px, {results['config']}:",
        f"  capacity (A alone): {60 * results['capacity_images_per_s']:.1f} images/min; "
        f"B sends {60 * results['b_rate_per_s']:.1f}/min",
        f"  B p95 alone {results['b_p95_alone_s']:.2f} s, under A's flood {results['b_p95_flood_s']:.2f} s",
        f"  during the flood: A {60 * results['a_images_per_s_during_flood']:.1f}/min, "
        f"B {60 * results['b_images_per_s_during_flood']:.1f}/min",
        "| ratio | target | measured | met |",
        "|---|---|---|---|",
    ]
    for name, value in results["ratios"].items():
        op, target = TARGETS[name]
        lines.append(f"| {name} | {op} {target} | {value:.2f} | {'yes' if results['met'][name] else 'MISS'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=256, help="every request's size (256: stages I and II)")
    parser.add_argument("--config", type=Path, default=ROOT / "deploy" / "local.yaml")
    parser.add_argument("--share", type=float, default=0.3, help="B's rate as a share of the capacity (0.3)")
    parser.add_argument("--b-requests", type=int, default=20, help="B's requests in each of runs 2 and 3")
    parser.add_argument("--flood", type=int, default=8, help="A's requests in flight")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    results = run(args.preset, args.size, args.share, args.b_requests, args.flood, args.config.resolve())
    report(results, "bench_fairness", argv, args.json, render)


if __name__ == "__main__":
    main()
