"""A 200-item batch through OpenAI's Batch API against the interactive path, on one served application
(deploy/local.yaml, the plan for this machine) in one run:

    1. interactive at saturation: a closed loop kept full (`--concurrency`) -> C images/s
    2. interactive alone: an open loop (Poisson) at `--share` x C -> its p95
    3. a `--items` batch alone (tenant in the batch class) -> its images/s, from creation to `completed`
    4. the same batch again, with the interactive load of 2 beside it -> the interactive p95 meanwhile

It prints, never asserting a time:

    batch_vs_interactive_throughput   3's images/s / C          (how much of the machine a batch uses)
    interactive_p95_during_vs_alone   4's interactive p95 / 2's (what a running batch costs interactive users)

    python -m benchmarks.bench_batch --preset tiny --json benchmarks/results/batch-tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import openai

from benchmarks.served import ROOT, config_name, report, served_with_tenants
from serve.loadgen import percentile, request_bodies, run_load
from stages.families import DEEPFLOYD_IF

ENDPOINT = "/v1/images/generations"


def run(preset: str, size: int, items: int, share: float, requests: int, concurrency: int, config_path: Path,
        progress=print) -> dict[str, Any]:  # fmt: skip
    fields = dict(DEEPFLOYD_IF.quick_params)
    with served_with_tenants(preset, config_path, {"web": "interactive", "jobs": "batch"}, progress) as served:
        config, url, keys = served
        measured = asyncio.run(
            _measure(url, size, fields, items, share, requests, concurrency, keys["web"], keys["jobs"], progress)
        )
    return measured | {"preset": preset, "size": size, "fields": fields, "items": items,
                       "config": config_name(config_path), "batch_in_flight": config.batch_in_flight()}  # fmt: skip


async def _run_batch(client: openai.AsyncOpenAI, bodies: list[dict]) -> tuple[float, Any]:
    """Submit the bodies as one batch; its wall time from creation to its end, and the ended batch."""
    lines = [
        {"custom_id": f"item-{i}", "method": "POST", "url": ENDPOINT,
         "body": {"prompt": b["prompt"], "size": f"{b['size']}x{b['size']}", **b["fields"]}}
        for i, b in enumerate(bodies)
    ]  # fmt: skip
    data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    source = await client.files.create(file=("bench.jsonl", data), purpose="batch")
    start = time.perf_counter()
    batch = await client.batches.create(input_file_id=source.id, endpoint=ENDPOINT, completion_window="24h")
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        await asyncio.sleep(0.5)
        batch = await client.batches.retrieve(batch.id)
    return time.perf_counter() - start, batch


async def _measure(url, size, fields, items, share, requests, concurrency, web_key, jobs_key, progress):
    def bodies(n: int, seed: int) -> list[dict]:
        return request_bodies(n, size=size, fields=fields, seed=seed)

    def p95(result) -> float:
        return percentile([o.latency_s for o in result.succeeded], 0.95)

    jobs = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=jobs_key, max_retries=5)
    await run_load(url, bodies(concurrency, 1), concurrency=concurrency, api_key=web_key, progress=False)  # warm
    progress(f"1. interactive at saturation, {concurrency} in flight ...")
    saturated = await run_load(url, bodies(4 * concurrency, 100), concurrency=concurrency, keep_full=True,
                               api_key=web_key)  # fmt: skip
    capacity = saturated.throughput
    rate = share * capacity
    progress(f"   {capacity:.2f} images/s; the interactive load will send {rate:.2f}/s")
    progress(f"2. interactive alone, {requests} requests ...")
    alone = await run_load(url, bodies(requests, 1000), rate=rate, api_key=web_key, seed=1)
    progress(f"   p95 alone {p95(alone):.2f} s")
    progress(f"3. a {items}-item batch alone ...")
    wall, batch = await _run_batch(jobs, bodies(items, 5000))
    if batch.status != "completed" or batch.request_counts.completed != items:
        raise RuntimeError(f"the batch ended {batch.status} with {batch.request_counts}: {batch.errors}")
    batch_rate = items / wall
    progress(f"   {wall:.1f} s: {batch_rate:.2f} images/s")
    progress(f"4. the batch again, with {requests} interactive requests beside it ...")
    running = asyncio.create_task(_run_batch(jobs, bodies(items, 9000)))
    await asyncio.sleep(2.0)  # the runner has claimed its first items
    during = await run_load(url, bodies(requests, 2000), rate=rate, api_key=web_key, seed=2)
    wall_with, second = await running
    progress(f"   interactive p95 during the batch {p95(during):.2f} s; the batch took {wall_with:.1f} s")
    ratios = {
        "batch_vs_interactive_throughput": batch_rate / capacity,
        "interactive_p95_during_vs_alone": p95(during) / p95(alone),
    }
    return {
        "interactive_images_per_s": capacity,
        "interactive_rate_per_s": rate,
        "batch_images_per_s": batch_rate,
        "batch_wall_s": wall,
        "batch_with_interactive_wall_s": wall_with,
        "batch_with_interactive_completed": second.request_counts.completed,
        "interactive_p95_alone_s": p95(alone),
        "interactive_p95_during_batch_s": p95(during),
        "interactive_failed": len(alone.outcomes) - len(alone.succeeded) + len(during.outcomes) - len(during.succeeded),
        "ratios": ratios,
        "runs": {"saturated": saturated.summary(), "alone": alone.summary(), "during_batch": during.summary()},
    }


def render(results: dict[str, Any]) -> str:
    ratios = results["ratios"]
    return "\n".join([
        f"batch, {results['preset']} preset, {results['size']} px, {results['items']} items, {results['config']}:",
        f"  interactive at saturation {results['interactive_images_per_s']:.2f} images/s; "
        f"batch alone {results['batch_images_per_s']:.2f} images/s ({results['batch_wall_s']:.0f} s, "
        f"{results['batch_in_flight']} in flight)",
        f"  interactive p95 alone {results['interactive_p95_alone_s']:.2f} s, during the batch "
        f"{results['interactive_p95_during_batch_s']:.2f} s (at {results['interactive_rate_per_s']:.2f} requests/s)",
        "| ratio | measured |",
        "|---|---|",
        f"| batch_vs_interactive_throughput | {ratios['batch_vs_interactive_throughput']:.2f} |",
        f"| interactive_p95_during_vs_alone | {ratios['interactive_p95_during_vs_alone']:.2f} |",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=64, help="every request's size (64: stage I only)")
    parser.add_argument("--items", type=int, default=200, help="lines in the batch")
    parser.add_argument("--config", type=Path, default=ROOT / "deploy" / "local.yaml")
    parser.add_argument("--share", type=float, default=0.3, help="the interactive rate as a share of saturation")
    parser.add_argument("--requests", type=int, default=40, help="interactive requests in runs 2 and 4")
    parser.add_argument("--concurrency", type=int, default=8, help="interactive requests in flight in run 1")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    results = run(args.preset, args.size, args.items, args.share, args.requests, args.concurrency,
                  args.config.resolve())  # fmt: skip
    report(results, "bench_batch", argv, args.json, render)


if __name__ == "__main__":
    main()
