"""DeciDiffusion (the latent family) benchmark, not a test: the throughput of the step-batched service
against diffusers' `StableDiffusionPipeline` called one request at a time, same checkpoints, same
cores, measured in one run.

    python -m benchmarks.bench_latent --preset small      # writes checkpoints/decidiffusion-small if missing

Runners, each given the same N requests at once (different prompts and seeds, the card's 30 steps):
- the reference: diffusers' pipeline, one request after the other, with every CPU thread;
- the in-process engine (no Ray): step-level batching, batch invariant;
- the served graph (Ray Serve, HTTP, the official `openai` client) in the replica layouts below,
  deployed in turn on one local Ray.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks.bench_stages import PROMPTS  # noqa: E402
from stages.cascade import Cascade  # noqa: E402
from stages.checkpoints import write_checkpoints  # noqa: E402
from stages.families import get_family  # noqa: E402

FAMILY = get_family("decidiffusion")
STAGE = FAMILY.stages[0].name  # its one denoising stage
STEPS = f"{STAGE}_steps"
# (label, denoiser replicas, threads per replica, max batch size)
LAYOUTS = [
    ("served, 1 replica x 2 threads, max batch 1", 1, 2, 1),
    ("served, 1 replica x 2 threads, max batch 4", 1, 2, 4),
    ("served, 2 replicas x 1 thread, max batch 4", 2, 1, 4),
]


def served_config(root: Path, replicas: int, threads: int, batch: int, tmp: Path, port: int):
    """The DeciDiffusion graph alone. Ray starts once, with the first layout's cluster and HTTP port, so
    every layout declares the same (room for the most denoiser replicas)."""
    from serve.config import parse_config

    most = max(layout[1] for layout in LAYOUTS)
    return parse_config(
        {
            "model": {"id": "decidiffusion", "family": FAMILY.name, "checkpoints": str(root)},
            "cluster": {"num_cpus": 8, "resources": {"pool_clip_text_encoder": 1, "pool_denoiser": most}},
            "http": {"port": port},
            "storage": {"url": str(tmp / "store")},
            "encoder": {"num_cpus": 1, "max_batch_size": 8},
            "stages": {
                STAGE: {
                    "pool": "pool_denoiser",
                    "num_cpus": threads,
                    "max_batch_size": batch,
                    "max_ongoing_requests": 16,
                    "autoscaling": {"min_replicas": replicas, "max_replicas": replicas},
                }
            },
        }
    )


def timed_served(config, requests: list[dict]) -> float:
    from openai import OpenAI

    from serve import local_cluster

    url = local_cluster.start(config, progress=lambda *_: None)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused-on-loopback", timeout=1800, max_retries=0)

    def one(fields: dict) -> None:
        extra = {k: v for k, v in fields.items() if k != "prompt"}
        client.images.generate(model="decidiffusion", prompt=fields["prompt"], extra_body=extra)

    one(requests[0])  # warm-up: first calls pay for lazy initialisation in every replica
    start = time.perf_counter()
    with ThreadPoolExecutor(len(requests)) as pool:
        list(pool.map(one, requests))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small"])
    parser.add_argument("--checkpoints", type=Path, help="default: checkpoints/decidiffusion-<preset>")
    parser.add_argument("-n", "--requests", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="denoising steps per image (the card's 30)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = args.checkpoints or Path("checkpoints") / f"decidiffusion-{args.preset}"
    if not root.is_dir() or not any(root.iterdir()):
        print(f"writing the {args.preset} checkpoints to {root}")
        write_checkpoints(FAMILY, args.preset, root)
    from tests.reference import latent_reference, load_latent_reference

    requests = [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": i, STEPS: args.steps} for i in range(args.requests)]
    print(f"# DeciDiffusion benchmark: preset {args.preset}, {args.threads} CPU threads, torch {torch.__version__}")
    print(f"\n## {args.requests} requests arriving together, 512 px, {args.steps} steps, guidance 7.5")

    pipe = load_latent_reference(root / FAMILY.encoder_folder)  # its one pipeline folder
    latent_reference(pipe, {**requests[0], STEPS: 1})  # warm-up
    start = time.perf_counter()
    for fields in requests:
        latent_reference(pipe, fields)
    reference_s = time.perf_counter() - start
    del pipe

    cascade = Cascade.from_checkpoints(root, family=FAMILY)
    params = [cascade.params(**fields) for fields in requests]
    cascade.generate(cascade.params(**{**requests[0], STEPS: 1}))  # warm-up
    results = {}
    start = time.perf_counter()
    cascade.generate_many(params, max_batch_size=4)
    results["in-process engine, step-level batching, max batch 4"] = time.perf_counter() - start
    del cascade

    from serve import local_cluster
    from tests.serving import free_port

    port = free_port()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for label, replicas, threads, batch in LAYOUTS:
                config = served_config(root, replicas, threads, batch, Path(tmp), port)
                results[label] = timed_served(config, requests)
    finally:
        local_cluster.stop()

    n = args.requests
    print("| runner | seconds | images/min | throughput vs reference |")
    print("|---|---|---|---|")
    results = {"diffusers StableDiffusionPipeline, one request at a time": reference_s, **results}
    for label, seconds in results.items():
        print(f"| {label} | {seconds:.1f} | {60 * n / seconds:.1f} | {reference_s / seconds:.2f}x |")


if __name__ == "__main__":
    main()
