"""`ifserve bench`'s load generator: requests to the HTTP API with the official `openai` client, open loop
(Poisson arrivals at a rate) or closed loop (a fixed concurrency), and what came back: latency end to
end and per stage (from the stage records in each response), throughput, and the share that met an
objective."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from serve.demo import PROMPTS as DEMO_PROMPTS

# The demo's four first (`--compare` sends them as the demo's burst), then four more.
PROMPTS = [
    *DEMO_PROMPTS,
    "a lighthouse on a cliff at dusk",
    "a corgi puppy in the snow",
    "a steam locomotive crossing a bridge",
    "a field of sunflowers under a storm",
]


@dataclass
class Outcome:
    index: int
    sent_s: float  # since the run started
    latency_s: float
    size: int
    error: str | None = None
    stages: list[dict] = field(default_factory=list)  # the response's per-stage records

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def done_s(self) -> float:
        return self.sent_s + self.latency_s


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by linear interpolation, as numpy's default; None when there is nothing."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class LoadResult:
    label: str
    mode: str  # "open" or "closed"
    offered: float | None  # requests/s (open loop)
    concurrency: int | None  # requests in flight (closed loop)
    outcomes: list[Outcome]
    objective_s: float | None = None
    kept_full: bool = False  # a closed loop that never drained (run_load's keep_full)
    started_at: float = 0.0  # time.perf_counter() when it started: outcomes' times count from it

    @property
    def succeeded(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.ok]

    @property
    def wall_s(self) -> float:
        return max((o.done_s for o in self.outcomes), default=0.0)

    @property
    def throughput(self) -> float:
        """Completed requests/s. A closed loop kept full: completions over the window from the k-th to the
        last (k: the concurrency, at most a third of them), all at full concurrency and past the start,
        when every request arrived at once. Otherwise completions over the wall time."""
        done = sorted(o.done_s for o in self.succeeded)
        if not done:
            return 0.0
        if self.mode == "closed" and self.kept_full and self.concurrency and len(done) >= 3:
            k = max(1, min(self.concurrency, len(done) // 3))
            return (len(done) - k) / (done[-1] - done[k - 1])
        return len(done) / self.wall_s

    def summary(self) -> dict[str, Any]:
        latencies = [o.latency_s for o in self.succeeded]
        stages: dict[str, dict[str, list[float]]] = {}
        for o in self.succeeded:
            for record in o.stages:
                entry = stages.setdefault(record["stage"], {"queue": [], "run": []})
                entry["queue"].append(record["queue_seconds"])
                entry["run"].append(record["run_seconds"])
        return {
            "label": self.label,
            "mode": self.mode,
            "offered_rps": self.offered,
            "concurrency": self.concurrency,
            "requests": len(self.outcomes),
            "succeeded": len(latencies),
            "failed": len(self.outcomes) - len(latencies),
            "errors": sorted({o.error for o in self.outcomes if o.error})[:5],
            "wall_s": self.wall_s,
            "throughput_rps": self.throughput,
            "latency_s": {f"p{q}": percentile(latencies, q / 100) for q in (50, 95, 99)},
            "mean_latency_s": statistics.fmean(latencies) if latencies else None,
            "met_objective": (
                sum(v <= self.objective_s for v in latencies) / len(self.outcomes)
                if self.objective_s and self.outcomes
                else None
            ),
            "stages": {
                name: {f"{part}_p{q}_s": percentile(v[part], q / 100) for part in ("queue", "run") for q in (50, 95)}
                for name, v in stages.items()
            },
            "outcomes": [asdict(o) for o in self.outcomes],
        }


def request_bodies(n: int, *, size: int, fields: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """n requests of one kind, prompts in turn, seeds seed, seed + 1, ..."""
    return [
        {"prompt": PROMPTS[i % len(PROMPTS)], "size": size, "fields": {**fields, "seed": seed + i}} for i in range(n)
    ]


async def run_load(
    url: str,
    bodies: list[dict[str, Any]],
    *,
    label: str = "",
    model: str | None = None,
    rate: float | None = None,
    concurrency: int | None = None,
    api_key: str | None = None,
    objective_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
    keep_full: bool = False,
    stop: asyncio.Event | None = None,
) -> LoadResult:
    """Send `bodies` (prompt, size, extra fields) open loop at `rate`, or closed loop `concurrency` at a
    time (all at once when neither is given). `keep_full`: the closed loop never drains; it sends more
    of the same kind (the bodies again, later seeds) until len(bodies) requests have completed, then
    cancels the ones still in flight, so that every completion counted happened at full concurrency.
    `stop`, with `keep_full`: end the loop that way earlier, when it is set (a flood that lasts as long
    as another load)."""
    from openai import AsyncOpenAI
    from tqdm.auto import tqdm

    if (rate is None) == (concurrency is None):
        concurrency = concurrency or len(bodies)
        rate = None
    client = AsyncOpenAI(
        base_url=f"{url.rstrip('/')}/v1", api_key=api_key or "not-needed-on-loopback", timeout=3600, max_retries=0
    )
    bar = tqdm(total=len(bodies), desc=label or "requests", unit="req", disable=not progress, leave=False)
    started = time.perf_counter()
    outcomes: list[Outcome] = []

    async def one(index: int, body: dict[str, Any]) -> None:
        sent = time.perf_counter()
        outcome = Outcome(index, sent - started, 0.0, body["size"])
        try:
            response = await client.images.generate(
                prompt=body["prompt"],
                size=f"{body['size']}x{body['size']}",
                response_format="b64_json",
                **({"model": model} if model else {}),
                extra_body=body.get("fields", {}),
            )
            outcome.stages = list((response.data[0].model_extra or {}).get("stages", []))
        except Exception as err:  # noqa: BLE001 - counted as a failure with its message
            outcome.error = f"{type(err).__name__}: {str(err)[:200]}"
        outcome.latency_s = time.perf_counter() - sent
        outcomes.append(outcome)
        bar.update()

    try:
        if rate is not None:
            arrivals = random.Random(seed)
            tasks = []
            for index, body in enumerate(bodies):
                tasks.append(asyncio.create_task(one(index, body)))
                await asyncio.sleep(arrivals.expovariate(rate))
            await asyncio.gather(*tasks)
        else:
            await _closed_loop(one, bodies, concurrency, outcomes, keep_full, stop or asyncio.Event())
    finally:
        bar.close()
        await client.close()
    outcomes.sort(key=lambda o: o.index)
    mode = "open" if rate else "closed"
    kept_full = keep_full and mode == "closed"
    return LoadResult(label, mode, rate, concurrency, outcomes, objective_s, kept_full=kept_full, started_at=started)


async def _closed_loop(
    one, bodies: list[dict], concurrency: int, outcomes: list, keep_full: bool, stop: asyncio.Event
) -> None:
    wanted = len(bodies)
    sent = 0

    def next_body() -> tuple[int, dict] | None:
        nonlocal sent
        if sent >= wanted and not keep_full:
            return None
        index, sent = sent, sent + 1
        body = bodies[index % wanted]
        if index >= wanted:  # another round of the same requests, with seeds of their own
            fields = body.get("fields", {})
            body = {**body, "fields": {**fields, "seed": fields.get("seed", 0) + index}}
        return index, body

    async def worker() -> None:
        while len(outcomes) < wanted and (item := next_body()) is not None:
            await one(*item)

    workers = [asyncio.create_task(worker()) for _ in range(min(concurrency, wanted))]
    if keep_full:  # stop at the wanted count of completions; what is still in flight is cancelled
        while len(outcomes) < wanted and not all(w.done() for w in workers) and not stop.is_set():
            await asyncio.sleep(0.05)
        for w in workers:
            w.cancel()
    await asyncio.gather(*workers, return_exceptions=True)
    del outcomes[wanted:]


def _offered(point: dict[str, Any]) -> float:
    if point["offered_rps"]:
        return point["offered_rps"]
    return 0.0 if point["concurrency"] == 1 else point["throughput_rps"]


def plot(results: dict[str, list[dict[str, Any]]], path: str, title: str = "") -> None:
    """Latency (p50 and p95) against offered load, one curve per configuration. A point's load is its
    open-loop rate, for a closed loop the throughput it drew, and 0 for one request at a time (idle)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, points in results.items():
        points = sorted(
            (_offered(p), p["latency_s"]["p50"], p["latency_s"]["p95"])
            for p in points
            if p["latency_s"]["p50"] is not None
        )
        if not points:
            continue
        x = [60 * p[0] for p in points]
        (line,) = axis.plot(x, [p[2] for p in points], marker="o", label=f"{label} p95")
        axis.plot(x, [p[1] for p in points], marker=".", linestyle="--", color=line.get_color(), label=f"{label} p50")
    axis.set_xlabel("offered load (requests/min; 0: one request at a time)")
    axis.set_ylabel("latency (s)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
