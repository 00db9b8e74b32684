"""`ifserve profile | plan | bench`: measure the stages, size the pools from the measurements, and measure
the served system against the plain loop and the plan (serve/cli.py registers them)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path

from stages.errors import InvalidParameter
from stages.families import DEFAULT_FAMILY, get_family


def _ints(flag: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag}: comma-separated integers, got {text!r}") from None
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError(f"{flag}: integers >= 1, got {text!r}")
        return values

    return parse


def _fields(text: str) -> dict:
    """`key=value,key=value` request fields (numbers as numbers)."""
    fields = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--fields: key=value pairs, got {pair!r}")
        try:
            fields[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            fields[key.strip()] = value.strip()
    return fields


def add_parsers(sub) -> None:
    pr = sub.add_parser("profile", help="measure each stage's step and image cost against batch size and threads")
    pr.add_argument("--family", default=DEFAULT_FAMILY, help=f"model family (default {DEFAULT_FAMILY})")
    pr.add_argument("--checkpoints", type=Path, help="the family's checkpoint folder (not with --random-weights)")
    pr.add_argument("--preset", help="write this preset there first if the folder is empty (and record it)")
    pr.add_argument(
        "--random-weights",
        action="store_true",
        help="build --preset's models with random weights in memory, on the device, in --dtype: no checkpoint "
        "folder and no disk (IF's full preset in float16 on a GPU); costs what the released weights cost",
    )
    pr.add_argument("--device", default="cpu", help="cpu, or cuda for one GPU")
    pr.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    pr.add_argument("--batch-sizes", type=_ints("--batch-sizes"), default=[1, 2, 4, 8])
    pr.add_argument(
        "--threads", type=_ints("--threads"), help="torch thread counts to try (CPU; default 1 and every core)"
    )
    pr.add_argument("--repeats", type=int, default=3, help="timed calls per point, at least (median)")
    pr.add_argument(
        "--batch-invariance",
        choices=["split", "per_task", "off"],
        default="split",
        help="the stages' invariance mode to profile (model.batch_invariance; default split)",
    )
    pr.add_argument("--no-batch-invariant", action="store_true", help="the same as --batch-invariance off")
    pr.add_argument("--out", type=Path, required=True, help="profile JSON to write")

    es = sub.add_parser(
        "estimate", help="a GPU profile estimated from the model configs alone, until one has been measured"
    )
    es.add_argument("--family", default=DEFAULT_FAMILY, help=f"model family (default {DEFAULT_FAMILY})")
    es.add_argument("--preset", default="full", help="the family's preset whose configs are estimated (default full)")
    es.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float16")
    es.add_argument(
        "--text-encoder-dtype",
        choices=["float32", "float16", "bfloat16"],
        help="the text encoder's dtype (model.text_encoder_dtype; default --dtype)",
    )
    es.add_argument("--batch-invariance", choices=["split", "per_task", "off"], default="split")
    es.add_argument("--batch-sizes", type=_ints("--batch-sizes"), default=[1, 2, 4, 8, 16])
    es.add_argument("--gpu-name", default="NVIDIA H100 80GB HBM3", help="what the profile names the GPU")
    es.add_argument("--gpu-memory-gib", type=float, default=79.0, help="memory of the GPU (default an H100's 79)")
    es.add_argument(
        "--tflops",
        type=float,
        default=200.0,
        help="sustained TFLOPS assumed in float16/bfloat16 (float32: a quarter); default 200, about 20%% of an "
        "H100 SXM's dense peak",
    )
    es.add_argument("--launch-us", type=float, default=10.0, help="microseconds assumed per kernel launch")
    es.add_argument("--out", type=Path, required=True, help="profile JSON to write")

    pl = sub.add_parser("plan", help="batch sizes, replicas, threads/GPUs and autoscaling from a profile and a load")
    pl.add_argument("--profile", type=Path, required=True, help="a profile JSON (`ifserve profile`)")
    load = pl.add_mutually_exclusive_group()
    load.add_argument("--rate", type=float, help="requests/s to serve (default: saturate the hardware)")
    load.add_argument("--concurrency", type=int, help="requests in flight (closed loop)")
    pl.add_argument(
        "--mix",
        action="append",
        metavar="WEIGHT:SIZE[:FIELDS]",
        help="a kind of request: weight, size and request fields, e.g. 3:1024:stage1_timesteps=fast27,stage2_steps=10 "
        "(repeatable; default: the family's default request)",
    )
    pl.add_argument("--p95", type=float, help="p95 latency objective in seconds")
    pl.add_argument("--utilisation", type=float, default=0.8, help="size replicas for this share of busy at --rate")
    pl.add_argument("--cores", type=int, help="CPU cores (default: the profile's)")
    pl.add_argument("--gpus", type=int, help="GPUs to share among the stages (GPU profiles)")
    pl.add_argument("--gpu-memory-gib", type=float, help="memory of one GPU (default: the profile's)")
    pl.add_argument("--prometheus", help="read the observed rate and mix from this Prometheus URL instead")
    pl.add_argument("--model", help="the served model id to read from Prometheus (default: the base config's)")
    pl.add_argument("--window", default="15m", help="Prometheus range for the observed load")
    pl.add_argument("--base", type=Path, default=Path("deploy/local.yaml"), help="config the plan fills in")
    pl.add_argument("--out", type=Path, help="write the planned config here (loads with `ifserve up --config`)")
    pl.add_argument("--json", type=Path, help="also write the plan's numbers as JSON")

    be = sub.add_parser("bench", help="load generator against the HTTP API; --compare runs the whole comparison")
    be.add_argument("--compare", action="store_true", help="reference loop vs served configs, in one run")
    be.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="--compare: the checkpoints' preset")
    be.add_argument("--checkpoints", type=Path, help="--compare: folder (default checkpoints/PRESET)")
    be.add_argument("--profile", type=Path, help="--compare: use this profile instead of profiling first")
    be.add_argument("--url", default="http://127.0.0.1:8000", help="the service (without --compare)")
    be.add_argument("--model", help="model id to request (default: the service's default)")
    be.add_argument("--api-key", default=os.environ.get("IFSERVE_API_KEY"))
    how = be.add_mutually_exclusive_group()
    how.add_argument("--rate", type=float, action="append", help="open loop: Poisson arrivals/s (repeatable)")
    how.add_argument(
        "--concurrency",
        type=int,
        action="append",
        help="closed loop: requests in flight, kept full until --requests have completed (repeatable)",
    )
    be.add_argument("--requests", type=int, default=16, help="requests per load point")
    be.add_argument("--size", type=int, default=1024)
    be.add_argument("--fields", type=_fields, default=None, help="request fields, e.g. stage2_steps=10,stage3_steps=10")
    be.add_argument("--objective", type=float, help="latency objective (s): the share that met it is reported")
    be.add_argument("--json", type=Path, help="write every measurement here")
    be.add_argument("--plot", type=Path, help="PNG of latency against offered load")
    be.add_argument("--out", type=Path, default=Path("out/bench"), help="--compare: profile and planned config")


def profile(args) -> int:
    import torch

    from stages.checkpoints import write_checkpoints
    from stages.profiling import hardware, profile_family

    family = get_family(args.family)
    root = args.checkpoints
    if args.random_weights:
        if not args.preset or root is not None:
            raise InvalidParameter("--random-weights", "takes --preset and no --checkpoints: nothing is read")
    elif root is None:
        raise InvalidParameter("--checkpoints", "is required (or --random-weights with --preset)")
    elif args.preset and (not root.is_dir() or not any(root.iterdir())):
        print(f"writing the {args.preset} preset to {root}", flush=True)
        write_checkpoints(family, args.preset, root)
    threads = args.threads or sorted({1, hardware(args.device).cores})
    command = "ifserve " + " ".join(shlex.quote(a) for a in args.argv)
    start = time.perf_counter()
    result = profile_family(
        family,
        root,
        device=args.device,
        torch_dtype=getattr(torch, args.dtype),
        batch_invariant="off" if args.no_batch_invariant else args.batch_invariance,
        batch_sizes=args.batch_sizes,
        threads=threads,
        repeats=args.repeats,
        preset=args.preset,
        command=command,
        progress=lambda line: print(f"profiling {line} ...", flush=True),
        random_weights=args.random_weights,
    )
    result.save(args.out)
    print(_profile_table(result))
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")
    return 0


def estimate(args) -> int:
    from serve.planner import estimate_profile

    command = "ifserve " + " ".join(shlex.quote(a) for a in args.argv)
    result = estimate_profile(
        args.family,
        preset=args.preset,
        dtype=args.dtype,
        text_encoder_dtype=args.text_encoder_dtype,
        invariance=args.batch_invariance,
        batch_sizes=args.batch_sizes,
        gpu_name=args.gpu_name,
        gpu_memory_gib=args.gpu_memory_gib,
        tflops=args.tflops,
        launch_us=args.launch_us,
        command=command,
    )
    result.save(args.out)
    print(_profile_table(result))
    gib = 1 << 30
    for name, stage in [("text_encoder", result.encoder), *result.stages.items()]:
        peaks = ", ".join(f"batch {b} {v / gib:.1f}" for b, v in stage.peak_memory_bytes.items())
        weights = stage.weights_bytes
        print(f"{name}: weights {weights / gib:.2f} GiB ({weights / 1e9:.2f} GB); peak GiB {peaks}")
    print(f"wrote {args.out}: an estimate ({result.hardware.name}); measure with `ifserve profile --device cuda`")
    return 0


def _profile_table(result) -> str:
    lines = ["| stage | threads | " + " | ".join(f"batch {b} step s (per image)" for b in _batches(result)) + " |"]
    lines.append("|---|---|" + "---|" * len(_batches(result)))
    for name, stage in [("text_encoder", result.encoder), *result.stages.items()]:
        for t, row in stage.step_s.items():
            cells = " | ".join(f"{row[b]:.4f} ({row[b] / b:.4f})" if b in row else "-" for b in _batches(result))
            lines.append(f"| {name} | {t} | {cells} |")
    return "\n".join(lines)


def _batches(result) -> list[int]:
    return sorted({b for s in (result.encoder, *result.stages.values()) for row in s.step_s.values() for b in row})


def _mix(entries: list[str] | None):
    from serve.planner import MixEntry

    if not entries:
        return [MixEntry()]
    mix = []
    for entry in entries:
        weight, _, rest = entry.partition(":")
        size, _, fields = rest.partition(":")
        try:
            mix.append(MixEntry(weight=float(weight), size=int(size) if size else None, fields=_fields(fields)))
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise InvalidParameter("--mix", f"WEIGHT:SIZE[:key=value,...], got {entry!r} ({err})") from None
    return mix


def plan(args) -> int:
    import yaml

    from serve.config import parse_config
    from serve.planner import Load, Objectives, demand_from_prometheus
    from serve.planner import plan as make_plan
    from stages.profiling import Profile

    try:
        profile = Profile.load(args.profile)
    except OSError as err:
        raise InvalidParameter("--profile", f"cannot read {args.profile}: {err.strerror}") from None
    except ValueError as err:
        raise InvalidParameter("--profile", f"{args.profile} is not a profile: {str(err)[:300]}") from None
    base = yaml.safe_load(args.base.read_text()) if args.base.is_file() else None
    if base is None:
        raise InvalidParameter("--base", f"cannot read {args.base}")
    if base.get("model", {}).get("family", DEFAULT_FAMILY) != profile.family:
        raise InvalidParameter("--base", f"serves {base['model'].get('family')}, the profile is of {profile.family}")
    family = get_family(profile.family)
    stage_demand = None
    rate = args.rate
    if args.prometheus:
        model = args.model or base["model"]["id"]
        rate, stage_demand = demand_from_prometheus(args.prometheus, family, model, args.window)
        print(f"observed in Prometheus over {args.window}: {rate:.4f} requests/s of {model}")
    load = Load(rate=rate, concurrency=args.concurrency, mix=_mix(args.mix))
    objectives = Objectives(p95_s=args.p95, utilisation=args.utilisation)
    memory = int(args.gpu_memory_gib * (1 << 30)) if args.gpu_memory_gib else None
    result = make_plan(
        profile, load, objectives, cores=args.cores, gpus=args.gpus, gpu_memory_bytes=memory, stage_demand=stage_demand
    )
    print(f"profile: {args.profile} ({profile.hardware.label}, {profile.family}, {profile.preset or 'no preset'})")
    print(result.table())
    if args.out:
        config = result.config(base)
        parse_config(config)  # what `ifserve up` will load
        header = f"# Planned by `ifserve {' '.join(shlex.quote(a) for a in args.argv)}`\n"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(header + yaml.safe_dump(config, sort_keys=False))
        print(f"wrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps(result.summary(), indent=2) + "\n")
    return 0


def bench(args) -> int:
    from serve.loadgen import plot, request_bodies, run_load

    if args.compare:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from benchmarks.compare import compare, write

        results = compare(
            args.preset,
            out=args.out,
            checkpoints=args.checkpoints,
            profile_path=args.profile,
            progress=lambda line: print(line, flush=True),
        )
        write(results, args.json, args.plot)
        return 0
    fields = args.fields if args.fields is not None else {}
    bodies = request_bodies(args.requests, size=args.size, fields=fields)
    points = [("rate", r) for r in args.rate or []] + [("concurrency", c) for c in args.concurrency or []]
    summaries = []
    for how, value in points or [("concurrency", 1)]:
        result = asyncio.run(
            run_load(
                args.url,
                bodies,
                label=f"{how} {value}",
                model=args.model,
                api_key=args.api_key,
                objective_s=args.objective,
                **{how: value},
            )
        )
        summary = result.summary()
        summaries.append(summary)
        latency = summary["latency_s"]
        met = "" if summary["met_objective"] is None else f", {summary['met_objective']:.0%} within {args.objective} s"
        print(
            f"{how} {value}: {summary['succeeded']}/{summary['requests']} ok, {summary['throughput_rps']:.4f} req/s, "
            f"p50 {latency['p50'] or 0:.2f} s, p95 {latency['p95'] or 0:.2f} s, p99 {latency['p99'] or 0:.2f} s{met}"
        )
        for stage, numbers in summary["stages"].items():
            print(
                f"  {stage}: queue p50 {numbers['queue_p50_s']:.2f} s p95 {numbers['queue_p95_s']:.2f} s, "
                f"run p50 {numbers['run_p50_s']:.2f} s p95 {numbers['run_p95_s']:.2f} s"
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"url": args.url, "points": summaries}, indent=2) + "\n")
    if args.plot:
        plot({args.url: summaries}, str(args.plot))
    return 0
