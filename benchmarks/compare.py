"""`ifserve bench --compare --preset {tiny,small}`: the served system against the seed's plain diffusers
loop and against its own plan, in one run on this machine (same checkpoints, same cores).

    (a) reference: the seed's diffusers code (tests/reference.py), one request at a time, all cores
    (b) served, request-level batching: the planned pools, every stage in `mode: request` at max batch 4,
        no admission limit (batches need waiting requests to form from)
    (c) served, the shipped deploy/local.yaml (step-level batching)
    (d) served, the config planned from this run's profile (step-level batching)

The requests are the demo's: 1024 px, IF's quick steps (fast27/10/10), prompts in turn, seeds 1, 2, ...
It prints and writes (`--json`) every measurement and the `ratios` the capacity issue asks for, and
plots latency against offered load (`--plot`).
"""

from __future__ import annotations

import asyncio
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from serve import local_cluster
from serve.config import parse_config
from serve.loadgen import plot, request_bodies, run_load
from serve.planner import Load, MixEntry, plan
from stages.cascade import Cascade
from stages.checkpoints import write_checkpoints
from stages.families import DEEPFLOYD_IF
from stages.images import png_bytes
from stages.profiling import Profile, hardware, profile_family

FAMILY = DEEPFLOYD_IF
SIZE = 1024
REQUEST_BATCH = 4  # what a request-level server batches (Ray Serve's @serve.batch style)
LONE = 3  # a lone request's latency: the median of this many, one after the other
ROOT = Path(__file__).resolve().parents[1]


def _reference():
    """The seed's reference code lives with the tests; a benchmark run from a checkout imports it."""
    if not (ROOT / "tests" / "reference.py").is_file():
        raise SystemExit("ifserve bench --compare: run it from a checkout of the repository (needs tests/reference.py)")
    sys.path.insert(0, str(ROOT))
    from tests.reference import load_reference, reference_cascade

    return load_reference, reference_cascade


def compare(
    preset: str,
    *,
    out: Path,
    checkpoints: Path | None = None,
    shipped: Path = ROOT / "deploy" / "local.yaml",
    profile_path: Path | None = None,
    requests: int | None = None,
    progress=print,
) -> dict[str, Any]:
    """Everything in one run; `requests` per load point (default 14 at tiny, 10 at small, to stay
    within 20 minutes on 2 cores)."""
    started = time.perf_counter()
    requests = requests or (14 if preset == "tiny" else 10)
    batch_sizes = [1, 2, 4] if preset == "tiny" else [1, 2]
    out.mkdir(parents=True, exist_ok=True)
    root = checkpoints or Path("checkpoints") / preset
    if not root.is_dir() or not any(root.iterdir()):
        progress(f"writing the {preset} checkpoints to {root}")
        write_checkpoints(FAMILY, preset, root)
    cores = hardware("cpu").cores
    fields = dict(FAMILY.quick_params)
    results: dict[str, Any] = {"preset": preset, "size": SIZE, "fields": fields, "checkpoints": str(root)}

    # -- profile and plan ------------------------------------------------------------------------------
    if profile_path is not None:
        profile = Profile.load(profile_path)
        progress(f"profile: {profile_path}")
    else:
        sizes = ",".join(map(str, batch_sizes))
        progress(f"profiling every stage (batch {sizes}; 1 thread and all cores) ...")
        command = f"ifserve profile --checkpoints {root} --preset {preset} --threads 1,{cores} --batch-sizes {sizes}"
        profile = profile_family(
            FAMILY, root, threads=[1, cores], batch_sizes=batch_sizes, preset=preset, command=command, progress=progress
        )
        profile.save(out / "profile.json")
    results["profile"] = profile.model_dump(mode="json")
    the_plan = plan(profile, Load(mix=[MixEntry(size=SIZE, fields=fields)]))
    progress(the_plan.table())
    base = yaml.safe_load(shipped.read_text())
    base["model"] = {**base["model"], "checkpoints": str(root), "preset": preset}
    planned = the_plan.config(base)
    (out / "planned.yaml").write_text(yaml.safe_dump(planned, sort_keys=False))
    results["plan"] = the_plan.summary()

    # -- (a) the seed's loop, and the in-process cascade, each in a process of its own ----------------
    # (a process that ran torch keeps its thread pools and allocations: the served runs must not share it)
    demo = request_bodies(4, size=SIZE, fields=fields, seed=1)
    times = _in_child(_reference_seconds, root, demo, cores)
    reference = {"seconds": times, "burst4_s": sum(times), "throughput_rps": len(times) / sum(times)}
    progress(f"(a) reference loop, {cores} threads: {', '.join(f'{t:.2f}' for t in times)} s per image")
    threads = min(c.threads for c in the_plan.stages)  # one count for the in-process cascade
    inprocess_s = statistics.median(_in_child(_inprocess_seconds, root, demo, threads))
    progress(f"in-process cascade, {threads} thread(s), one request with its PNG: {inprocess_s:.2f} s (median)")
    results["reference"] = reference
    results["inprocess_latency_s"] = inprocess_s

    # -- the served configurations ---------------------------------------------------------------------
    request_level = copy.deepcopy(planned)
    request_level["ingress"].pop("max_images_in_flight", None)  # batches need requests to form from
    for stage in request_level["stages"].values():
        stage.update(mode="request", max_batch_size=REQUEST_BATCH, max_ongoing_requests=2 * REQUEST_BATCH)
    shipped_config = {**yaml.safe_load(shipped.read_text())}
    shipped_config["model"] = {**shipped_config["model"], "checkpoints": str(root), "preset": preset}
    runs = {}
    # enough in flight to keep the plan's admission full (or every replica busy), and no more
    saturate = (the_plan.in_flight or sum(s.replicas for s in the_plan.stages)) + 2
    bodies = request_bodies(requests, size=SIZE, fields=fields, seed=100)

    def served(label: str, config: dict, session) -> dict[str, Any]:
        progress(f"\n{label}: starting ...")
        url = local_cluster.start(parse_config(config), progress=lambda line: None)
        try:
            # one request per replica of the widest stage, so that no measured request meets a cold one
            warm = request_bodies(widest(config), size=SIZE, fields=fields, seed=50)
            asyncio.run(run_load(url, warm, label="warm-up", progress=False))
            return session(url)
        finally:
            local_cluster.stop()

    def load(url, label: str, chosen: list, **how) -> dict[str, Any]:
        summary = asyncio.run(run_load(url, chosen, label=label, seed=7, **how)).summary()
        summary.pop("outcomes")
        progress(
            f"  {label}: {summary['succeeded']}/{summary['requests']} ok, {summary['throughput_rps']:.4f}/s, "
            f"p50 {summary['latency_s']['p50'] or 0:.1f} s, p95 {summary['latency_s']['p95'] or 0:.1f} s"
        )
        return summary

    def planned_session(url) -> dict[str, Any]:
        run = {
            "lone": load(url, f"one request at a time, {LONE} times", demo[1:2] * LONE, concurrency=1),
            "burst4": load(url, "burst of the 4 demo prompts", demo, concurrency=4),
            "saturated": load(url, f"closed loop x{saturate}", bodies, concurrency=saturate, keep_full=True),
        }
        rates["p70"] = 0.7 * run["saturated"]["throughput_rps"]
        run["p70"] = load(url, f"open loop at 70 % ({rates['p70']:.4f}/s)", bodies, rate=rates["p70"])
        return run

    rates: dict[str, float] = {}
    runs["d_planned"] = served("(d) planned", planned, planned_session)
    runs["b_request_level"] = served(
        "(b) request-level",
        request_level,
        lambda url: {
            "lone": load(url, "one request", demo[1:2], concurrency=1),
            "p70": load(url, f"open loop at (d)'s 70 % ({rates['p70']:.4f}/s)", bodies, rate=rates["p70"]),
        },
    )
    # the demo's burst on what `ifserve demo` runs (deploy/local.yaml, or --shipped)
    runs["c_shipped"] = served(
        "(c) shipped",
        shipped_config,
        lambda url: {"burst4": load(url, "burst of the 4 demo prompts", demo, concurrency=4)},
    )
    results["runs"] = runs

    d = runs["d_planned"]
    b = runs["b_request_level"]
    d_sat = d["saturated"]["throughput_rps"]
    ratios = {
        "throughput_vs_reference": d_sat / reference["throughput_rps"],
        "throughput_vs_bound": d_sat / the_plan.bound,
        "burst4_vs_reference": d["burst4"]["wall_s"] / reference["burst4_s"],
        "latency_vs_inprocess": d["lone"]["latency_s"]["p50"] / inprocess_s,
        "p95_step_vs_request": d["p70"]["latency_s"]["p95"] / b["p70"]["latency_s"]["p95"],
        "plan_error": the_plan.throughput / d_sat - 1,
        "idle_latency_vs_reference": d["lone"]["latency_s"]["p50"] / statistics.median(times),
    }
    targets = {
        "throughput_vs_reference": (">=", 1.1),
        "throughput_vs_bound": (">=", 0.85),
        "burst4_vs_reference": ("<=", 1.0),
        "latency_vs_inprocess": ("<=", 1.05),
        "p95_step_vs_request": ("<=", 0.7),
        "plan_error": ("abs<=", 0.15),
    }
    results["ratios"] = ratios
    results["targets"] = {k: f"{op} {v}" for k, (op, v) in targets.items()}
    results["met"] = {k: _met(ratios[k], *targets[k]) for k in targets}
    results["seconds"] = time.perf_counter() - started

    progress(f"\n## ifserve bench --compare --preset {preset} ({profile.hardware.label}, {results['seconds']:.0f} s)")
    progress("| ratio | value | target | met |")
    progress("|---|---|---|---|")
    for key, value in ratios.items():
        target = results["targets"].get(key, "printed only")
        met = results["met"].get(key)
        progress(f"| {key} | {value:.3f} | {target} | {'yes' if met else ('-' if met is None else 'NO')} |")
    curves = {
        "(d) planned, step-level": [d["lone"], d["p70"], d["saturated"]],
        f"(b) request-level, batch {REQUEST_BATCH}": [b["lone"], b["p70"]],
        "(c) shipped, burst of 4": [runs["c_shipped"]["burst4"]],
    }
    results["curves"] = curves
    return results


def _in_child(function, *args):
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _params(bodies: list[dict]) -> list:
    kind = FAMILY.kind("text-to-image").params
    return [kind.parse(prompt=b["prompt"], size=b["size"], **b["fields"]) for b in bodies]


def _reference_seconds(root: Path, bodies: list[dict], threads: int) -> list[float]:
    """The seed's reference code, one request after the other (after one warm-up), all `threads`."""
    load_reference, reference_cascade = _reference()
    torch.set_num_threads(threads)
    pipes = load_reference(root)
    params = _params(bodies)
    reference_cascade(pipes, params[0])
    times = []
    for p in params:
        begin = time.perf_counter()
        reference_cascade(pipes, p)
        times.append(time.perf_counter() - begin)
    return times


def _inprocess_seconds(root: Path, bodies: list[dict], threads: int) -> list[float]:
    """The in-process cascade, one request and its PNG, LONE times after a warm-up."""
    torch.set_num_threads(threads)
    cascade = Cascade.from_checkpoints(root)
    params = _params(bodies)
    png_bytes(cascade.generate(params[0]).image)
    times = []
    for _ in range(LONE):
        begin = time.perf_counter()
        png_bytes(cascade.generate(params[1]).image)
        times.append(time.perf_counter() - begin)
    return times


def widest(config: dict) -> int:
    return max(s.get("autoscaling", {}).get("max_replicas", 1) for s in config["stages"].values())


def _met(value: float, op: str, target: float) -> bool:
    if op == ">=":
        return value >= target
    if op == "<=":
        return value <= target
    return abs(value) <= target


def write(results: dict[str, Any], json_path: Path | None, plot_path: Path | None) -> None:
    import json

    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    if plot_path is not None:
        plot(results["curves"], str(plot_path), title=f"{results['preset']} preset, {results['size']} px")


def render(results: dict[str, Any]) -> str:
    """The run as Markdown: the ratios against their targets, then every configuration's figures."""
    plan_ = results["plan"]
    ref = results["reference"]
    lines = [
        "| ratio | value | target | met |",
        "|---|---|---|---|",
    ]
    for key, value in results["ratios"].items():
        met = results["met"].get(key)
        target = results["targets"].get(key, "printed only")
        lines.append(f"| `{key}` | {value:.3f} | {target} | {'yes' if met else ('-' if met is None else '**no**')} |")
    lines += [
        "",
        "| configuration | lone request (s, median) | burst of 4 (s) | saturated (req/min) | p50 / p95 at 70 % (s) |",
        "|---|---|---|---|---|",
        f"| (a) reference loop, {results['profile']['hardware']['cores']} threads "
        f"| {statistics.median(ref['seconds']):.2f} | {ref['burst4_s']:.1f} | {60 * ref['throughput_rps']:.2f} | - |",
        f"| in-process cascade, the plan's threads | {results['inprocess_latency_s']:.2f} | - | - | - |",
    ]
    names = {
        "d_planned": "(d) served, planned",
        "b_request_level": f"(b) served, request-level, batch {REQUEST_BATCH}",
        "c_shipped": "(c) served, shipped deploy/local.yaml",
    }
    for key, label in names.items():
        run = results["runs"][key]
        lone = f"{run['lone']['latency_s']['p50']:.2f}" if "lone" in run else "-"
        burst = f"{run['burst4']['wall_s']:.1f}" if "burst4" in run else "-"
        saturated = f"{60 * run['saturated']['throughput_rps']:.2f}" if "saturated" in run else "-"
        p70 = run.get("p70", {}).get("latency_s")
        at70 = f"{p70['p50']:.1f} / {p70['p95']:.1f}" if p70 else "-"
        lines.append(f"| {label} | {lone} | {burst} | {saturated} | {at70} |")
    lines += [
        "",
        f"Plan: predicted {60 * plan_['throughput']:.2f} req/min, compute bound {60 * plan_['bound']:.2f} req/min, "
        f"bottleneck {plan_['bottleneck']}, lone request {plan_['idle_latency_s']:.2f} s, "
        f"{plan_['in_flight']} images in flight; "
        + ", ".join(
            f"{name} batch {s['batch']} x{s['replicas']} ({s['threads']} thread{'s' if s['threads'] > 1 else ''})"
            for name, s in plan_["stages"].items()
        )
        + f". Run took {results['seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import json

    for path in sys.argv[1:]:
        print(render(json.loads(Path(path).read_text())))
