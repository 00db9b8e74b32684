"""`ifserve` command line.

ifserve checkpoints --preset tiny --out checkpoints/tiny
ifserve generate --checkpoints checkpoints/tiny --prompt "a red bicycle" --seed 1 --out bike.png
ifserve up --config deploy/local.yaml [--checkpoints DIR] [--port N]
ifserve demo [--config deploy/local.yaml]
ifserve serve-config --config deploy/cluster.yaml > deploy/serve/cluster.yaml
ifserve serve-config --config deploy/cluster.yaml --kuberay > deploy/kuberay/rayservice.yaml
ifserve hash-key KEY
ifserve profile --checkpoints checkpoints/tiny --out benchmarks/profiles/cpu-tiny.json
ifserve plan --profile benchmarks/profiles/cpu-tiny.json --out deploy/local.yaml
ifserve bench --compare --preset tiny --json out/bench/tiny.json --plot out/bench/tiny.png
ifserve tenants create NAME [--priority interactive|batch] [--weight W] [--rpm N] [--ipm N] [--max-concurrent N]
ifserve tenants list | update NAME [same flags] | delete NAME
ifserve keys create --tenant NAME          (prints the key once, as the last line)
ifserve keys list [--tenant NAME] | revoke KEY_ID
    (tenants and keys: --config deploy/local.yaml, or --database URL to override tenancy.database)
ifserve batch submit FILE.jsonl [--wait] | status ID [--wait] | results ID --out DIR | cancel ID
    (--url http://127.0.0.1:8000 or $IFSERVE_URL, --api-key or $IFSERVE_API_KEY)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# Quiet the libraries' import-time notices (e.g. "CLIPImageProcessor requires torchvision") and
# never reach for the Hugging Face Hub: weights load from local folders or the local cache only.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import types
import typing

from serve import cli_batch, cli_capacity, cli_tenancy
from stages.errors import CheckpointError, InvalidParameter, StageFailure
from stages.families import DEFAULT_FAMILY, get_family
from stages.family import TEXT_TO_IMAGE
from stages.params import RequestParams


def _flag_type(annotation) -> tuple[type, list | None]:
    """The argparse type (and choices) of a request field: its type without None; a Literal's values."""
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return _flag_type(options[0])
    if typing.get_origin(annotation) is typing.Literal:
        return type(options[0]), options
    return annotation, None


def _generation_flags(parser: argparse.ArgumentParser, kinds: list[type[RequestParams]]) -> None:
    """One flag per field of the family's request parameters (`stage1_steps` -> --stage1-steps), with the
    field's description and default (text-to-image's; an edit's own fields, e.g. strengths, with the
    image-to-image default): declared once, in the family."""
    fields = {}
    for params in kinds:
        for name, info in params.model_fields.items():
            fields.setdefault(name, info)
    for name, info in fields.items():
        kind, choices = _flag_type(info.annotation)
        default = "" if info.default is None or info.is_required() else f" (default {info.default})"
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            choices=choices,
            required=name == "prompt",
            help=f"{info.description or name}{default}",
        )


def _family_name(argv: list[str] | None) -> str:
    """`--family NAME` from the command line before the parser exists: the flags depend on it."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--family" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--family="):
            return arg.partition("=")[2]
    return DEFAULT_FAMILY


def _parser(family_name: str = DEFAULT_FAMILY) -> argparse.ArgumentParser:
    family = get_family(family_name)
    folders = ", ".join(family.folders)
    parser = argparse.ArgumentParser(prog="ifserve", description="Serve cascaded diffusion models stage by stage.")
    sub = parser.add_subparsers(dest="command", required=True)

    def family_flag(command: argparse.ArgumentParser) -> None:
        command.add_argument("--family", default=DEFAULT_FAMILY, help=f"model family (default {DEFAULT_FAMILY})")

    ck = sub.add_parser("checkpoints", help="write random-weight diffusers checkpoints of a preset")
    family_flag(ck)
    ck.add_argument("--preset", choices=family.presets, default=family.presets[0] if family.presets else None)
    ck.add_argument("--out", type=Path, required=True, help=f"folder that receives {folders}")
    ck.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ck.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    ck.add_argument("--safety-checker", action="store_true", help="also write the family's safety modules")

    gen = sub.add_parser("generate", help="generate one image in-process (no Ray)")
    family_flag(gen)
    gen.add_argument("--checkpoints", type=Path, required=True, help=f"folder with {folders}")
    _generation_flags(gen, [kind.params for kind in family.kinds])
    none = f" ({family.name} has none)"
    edits = "" if family.edit_kinds else none
    gen.add_argument("--image", type=Path, help=f"edit this picture (image-to-image; inpainting with --mask){edits}")
    gen.add_argument("--mask", type=Path, help=f"inpaint where this mask is white (or transparent){edits}")
    safety = "" if "safety_checker" in family.options else none
    gen.add_argument(
        "--safety-checker", action="store_true", help=f"pass the final image through the safety checker{safety}"
    )
    gen.add_argument("--out", type=Path, required=True, help="PNG file to write")
    gen.add_argument("--save-stages", action="store_true", help="also write each stage's image next to --out")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")

    up = sub.add_parser("up", help="start a local Ray with the config's pools, deploy, serve until stopped")
    _serving_flags(up)
    up.add_argument("--host", help="bind address (default: the config's http.host, loopback)")
    up.add_argument("--metrics-port", type=int, help="Ray exports Prometheus metrics on this port")

    demo = sub.add_parser("demo", help="start, send a few prompts over HTTP, save images and timings, stop")
    _serving_flags(demo)
    demo.add_argument("--api-key", default=os.environ.get("IFSERVE_API_KEY"), help="key the demo client sends")
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="folder for the images")
    demo.add_argument("--size", type=int, choices=[64, 256, 1024], default=1024)
    demo.add_argument("--prompt", action="append", dest="prompts", help="a prompt (repeatable; default: 4 built in)")
    demo.add_argument("--seed", type=int, default=1, help="seed of the first image; image i uses seed + i")
    demo.add_argument(
        "--default-steps",
        action="store_true",
        help="use the family's default steps, not its quick settings (IF: fast27/10/10)",
    )

    rs = sub.add_parser("serve-config", help="print the Ray Serve config file (serve deploy / KubeRay) for a config")
    rs.add_argument("--config", type=Path, required=True, help="serving config (YAML), as the cluster sees its path")
    rs.add_argument(
        "--kuberay",
        action="store_true",
        help="print KubeRay's RayService instead: serveConfigV2 plus a worker group per pool (deploy/kuberay/)",
    )

    key = sub.add_parser("hash-key", help="print the SHA-256 of an API key, for auth.api_key_sha256")
    key.add_argument("key")
    cli_capacity.add_parsers(sub)
    cli_tenancy.add_parsers(sub)
    cli_batch.add_parsers(sub)
    return parser


def _serving_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("deploy/local.yaml"), help="serving config (YAML)")
    parser.add_argument("--checkpoints", help="override model.checkpoints (the first model's; `models` keep theirs)")
    parser.add_argument("--port", type=int, help="override http.port")


def _load_serving_config(args):
    from serve.config import load_config

    return load_config(
        args.config,
        **{"model.checkpoints": args.checkpoints, "http.port": args.port, "http.host": getattr(args, "host", None)},
    )


def _up(args) -> int:
    import signal
    import threading

    from serve import local_cluster

    config = _load_serving_config(args)
    url = local_cluster.start(config, metrics_port=args.metrics_port)
    if args.metrics_port:
        print(
            f"metrics: http://127.0.0.1:{args.metrics_port}/metrics (every node's endpoint is listed in "
            f"{local_cluster.SERVICE_DISCOVERY_FILE}; see monitoring/README.md)",
            flush=True,
        )
    models = ", ".join(graph.model.id for graph in config.graphs)
    print(f"serving {models} at {url}  (OpenAI base URL {url}/v1, docs {url}/docs); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("shutting down: new requests get 503, those in flight finish ...", flush=True)
    try:
        left = local_cluster.drain(config, progress=lambda line: print(line, flush=True))
        if left:
            print(f"{left} request(s) still in flight after the drain bound", flush=True)
    except Exception as err:  # noqa: BLE001 - stop anyway
        print(f"could not drain ({err}); stopping", flush=True)
    local_cluster.stop()
    print("stopped", flush=True)
    return 0


def _demo(args) -> int:
    from serve.demo import PROMPTS, run_demo

    config = _load_serving_config(args)
    return run_demo(
        config,
        args.out,
        prompts=args.prompts or PROMPTS,
        size=args.size,
        quick=not args.default_steps,
        seed=args.seed,
        api_key=args.api_key,
        progress=lambda line: print(line, flush=True),
    )


def _serve_config(args) -> int:
    import yaml

    from serve.app import ray_serve_config
    from serve.config import load_config

    config = load_config(args.config)
    if args.kuberay:
        from serve.kuberay import manifest_yaml, manifests

        command, text = f"--config {args.config} --kuberay", manifest_yaml(manifests(str(args.config), config))
    else:
        command, text = (
            f"--config {args.config}",
            yaml.safe_dump(ray_serve_config(str(args.config), config), sort_keys=False),
        )
    print(f"# Generated by `ifserve serve-config {command}`; regenerate rather than edit.")
    print(text, end="")
    return 0


def _checkpoints(args) -> int:
    import torch

    from stages.checkpoints import write_checkpoints

    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    start = time.perf_counter()
    family = get_family(args.family)
    paths = write_checkpoints(
        family, args.preset, args.out, seed=args.seed, dtype=dtype, progress=print, safety_checker=args.safety_checker
    )
    for folder, path in paths.items():
        print(f"{folder}: {path}")
    print(f"wrote the {args.preset} preset in {time.perf_counter() - start:.1f} s")
    return 0


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise InvalidParameter(flag, f"cannot read {path}: {err.strerror}") from None


def _generate(args) -> int:
    import torch

    from stages.cascade import Cascade
    from stages.pictures import read_edit

    family = get_family(args.family)
    edit = None
    kind = family.kind(TEXT_TO_IMAGE)
    if args.image is not None:
        kind = family.edit_for(mask=args.mask is not None)
        edit = read_edit(_read(args.image, "--image"), _read(args.mask, "--mask") if args.mask else None)
    elif args.mask is not None:
        raise InvalidParameter("--mask", "needs --image, the picture to inpaint")
    given = {name for kind_ in family.kinds for name in kind_.params.model_fields if getattr(args, name) is not None}
    foreign = sorted(given - set(kind.params.model_fields))
    if foreign:
        raise InvalidParameter(foreign[0], f"is not a {kind.name} parameter")
    params = kind.params.parse(**{name: getattr(args, name) for name in given})
    if args.out.suffix.lower() != ".png":
        raise InvalidParameter("--out", f"must be a .png file, got {args.out}")
    torch.set_num_threads(max(1, args.threads))

    start = time.perf_counter()
    needed = tuple(spec.name for spec in family.stages_for(params.size))
    cascade = Cascade.from_checkpoints(
        args.checkpoints, family=family, device=args.device, stages=needed, safety_checker=args.safety_checker
    )
    print(f"loaded {args.checkpoints} in {time.perf_counter() - start:.1f} s")
    mark = [time.perf_counter()]

    def report(stage: str) -> None:
        now = time.perf_counter()
        print(f"{stage}: {now - mark[0]:.2f} s")
        mark[0] = now

    [result] = cascade.generate_many([params], on_stage_done=report, edits=[edit])
    if result.error is not None:
        raise result.error
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(args.out)
    print(f"wrote {args.out} ({params.size}x{params.size})")
    if result.nsfw_detected or result.watermark_detected:
        print("the safety checker flagged the image: it is black")
    if args.save_stages:
        for size, picture in result.images.items():
            path = args.out.with_name(f"{args.out.stem}-{size}.png")
            picture.save(path)
            print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        parser = _parser(_family_name(argv))
    except ValueError as err:  # an unknown --family
        print(f"ifserve: error: {err}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `profile` and `plan` record
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        if args.command == "hash-key":
            from serve.config import hash_key

            print(hash_key(args.key))
            return 0
        commands = {
            "checkpoints": _checkpoints,
            "generate": _generate,
            "up": _up,
            "demo": _demo,
            "serve-config": _serve_config,
            "profile": cli_capacity.profile,
            "estimate": cli_capacity.estimate,
            "plan": cli_capacity.plan,
            "bench": cli_capacity.bench,
            "tenants": cli_tenancy.tenants,
            "keys": cli_tenancy.keys,
            "batch": cli_batch.batch,
        }
        return commands[args.command](args)
    except (InvalidParameter, CheckpointError) as err:
        print(f"ifserve {args.command}: error: {err}", file=sys.stderr)
        return 2
    except StageFailure as err:
        print(f"ifserve {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
