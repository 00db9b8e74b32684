"""`ifserve` command line.

ifserve checkpoints --preset tiny --out checkpoints/tiny
ifserve generate --checkpoints checkpoints/tiny --prompt "a red bicycle" --seed 1 --out bike.png
ifserve up --config deploy/local.yaml [--checkpoints DIR] [--port N]
ifserve demo [--config deploy/local.yaml]
ifserve serve-config --config deploy/cluster.yaml > deploy/serve/cluster.yaml
ifserve hash-key KEY
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

from stages.errors import CheckpointError, InvalidParameter
from stages.params import TIMESTEP_LISTS

_GENERATION_FLAGS = [
    # (flag, type, help) - defaults live in GenerationParams, the single source of truth.
    ("--negative-prompt", str, "negative prompt, used by all three stages"),
    ("--seed", int, "seed of the generator shared by the three stages (default 0)"),
    ("--stage1-steps", int, "stage I denoising steps (default 100)"),
    ("--stage1-timesteps", str, f"stage I named timestep list: {', '.join(sorted(TIMESTEP_LISTS))}"),
    ("--stage1-guidance", float, "stage I guidance scale (default 7.0)"),
    ("--stage2-steps", int, "stage II denoising steps (default 50)"),
    ("--stage2-timesteps", str, "stage II named timestep list"),
    ("--stage2-guidance", float, "stage II guidance scale (default 4.0)"),
    ("--stage2-noise-level", int, "stage II noise added to the 64 px image, [0, 1000) (default 250)"),
    ("--stage3-steps", int, "stage III denoising steps (default 75)"),
    ("--stage3-guidance", float, "stage III guidance scale (default 9.0)"),
    ("--stage3-noise-level", int, "stage III noise added to the 256 px image, [0, 350] (default 100)"),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ifserve", description="Serve the DeepFloyd IF cascade stage by stage.")
    sub = parser.add_subparsers(dest="command", required=True)

    ck = sub.add_parser("checkpoints", help="write random-weight diffusers checkpoints of a preset")
    ck.add_argument("--preset", choices=["tiny", "small", "full"], default="tiny")
    ck.add_argument("--out", type=Path, required=True, help="folder that receives IF-I, IF-II and x4-upscaler")
    ck.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    ck.add_argument("--dtype", choices=["float32", "float16"], default="float32")

    gen = sub.add_parser("generate", help="generate one image in-process (no Ray)")
    gen.add_argument("--checkpoints", type=Path, required=True, help="folder with IF-I, IF-II and x4-upscaler")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--size", type=int, choices=[64, 256, 1024], default=1024, help="where the cascade stops")
    for flag, kind, text in _GENERATION_FLAGS:
        gen.add_argument(flag, type=kind, help=text)
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
        help="use the reference defaults (100/50/75 steps), not the quick fast27/10/10",
    )

    rs = sub.add_parser("serve-config", help="print the Ray Serve config file (serve deploy / KubeRay) for a config")
    rs.add_argument("--config", type=Path, required=True, help="serving config (YAML), as the cluster sees its path")

    key = sub.add_parser("hash-key", help="print the SHA-256 of an API key, for auth.api_key_sha256")
    key.add_argument("key")
    return parser


def _serving_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=Path("deploy/local.yaml"), help="serving config (YAML)")
    parser.add_argument("--checkpoints", help="override model.checkpoints")
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
    print(f"serving {config.model.id} at {url}  (OpenAI base URL {url}/v1, docs {url}/docs); Ctrl-C stops", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    print("shutting down ...", flush=True)
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
    print(f"# Generated by `ifserve serve-config --config {args.config}`; regenerate rather than edit.")
    print(yaml.safe_dump(ray_serve_config(str(args.config), config), sort_keys=False), end="")
    return 0


def _checkpoints(args) -> int:
    import torch

    from stages.checkpoints import write_checkpoints

    dtype = torch.float16 if args.dtype == "float16" else torch.float32
    start = time.perf_counter()
    paths = write_checkpoints(args.preset, args.out, seed=args.seed, dtype=dtype, progress=print)
    for stage, path in paths.items():
        print(f"{stage}: {path}")
    print(f"wrote the {args.preset} preset in {time.perf_counter() - start:.1f} s")
    return 0


def _generate(args) -> int:
    import torch

    from stages.cascade import Cascade
    from stages.params import GenerationParams

    fields = {"prompt": args.prompt, "size": args.size}
    for flag, _, _ in _GENERATION_FLAGS:
        name = flag.removeprefix("--").replace("-", "_")
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    params = GenerationParams.parse(**fields)
    if args.out.suffix.lower() != ".png":
        raise InvalidParameter("--out", f"must be a .png file, got {args.out}")
    torch.set_num_threads(max(1, args.threads))

    start = time.perf_counter()
    needed = tuple(s for s, size in (("stage1", 64), ("stage2", 256), ("stage3", 1024)) if size <= params.size)
    cascade = Cascade.from_checkpoints(args.checkpoints, device=args.device, stages=needed)
    print(f"loaded {args.checkpoints} in {time.perf_counter() - start:.1f} s")
    mark = [time.perf_counter()]

    def report(stage: str) -> None:
        now = time.perf_counter()
        print(f"{stage}: {now - mark[0]:.2f} s")
        mark[0] = now

    result = cascade.generate_many([params], on_stage_done=report)[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(args.out)
    print(f"wrote {args.out} ({params.size}x{params.size})")
    if args.save_stages:
        for size, picture in result.images.items():
            path = args.out.with_name(f"{args.out.stem}-{size}.png")
            picture.save(path)
            print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
        }
        return commands[args.command](args)
    except (InvalidParameter, CheckpointError) as err:
        print(f"ifserve {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
