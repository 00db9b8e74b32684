"""`ifserve demo`: start the local cluster, send a few prompts at once to every served model through the
HTTP API with the official `openai` client, save the images and a contact sheet (per model when the
config serves several), print per-stage timings, stop."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import PIL.Image

from serve.config import ServeConfig, model_slug
from stages.images import contact_sheet

PROMPTS = [
    'a photo of a kangaroo wearing an orange hoodie and blue sunglasses holding a sign that says "very deep learning"',
    "a red bicycle leaning against a brick wall",
    "an astronaut riding a horse on the moon, oil painting",
    "a bowl of ramen on a wooden table, studio lighting",
]


def run_demo(
    config: ServeConfig,
    out: Path,
    *,
    prompts: list[str],
    size: int,
    quick: bool,
    seed: int,
    api_key: str | None,
    progress=print,
) -> int:
    from openai import OpenAI

    from serve import local_cluster

    started = time.perf_counter()
    url = local_cluster.start(config, progress=progress)
    progress(f"serving at {url} ({time.perf_counter() - started:.1f} s to start)")
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "not-needed-on-loopback", timeout=1800)
        graphs = config.graphs
        # Every served model gets the prompts, all at once: with two families both are in flight together.
        jobs = [(graph, i) for graph in graphs for i in range(len(prompts))]

        def side(graph) -> int:  # the asked size where the family makes it, else its largest
            return size if size in graph.family.sizes else graph.family.sizes[-1]

        def one(job):
            graph, i = job
            extra = dict(graph.family.quick_params) if quick else {}
            begin = time.perf_counter()
            response = client.images.generate(
                model=graph.model.id,
                prompt=prompts[i],
                size=f"{side(graph)}x{side(graph)}",
                response_format="b64_json",
                extra_body={**extra, "seed": seed + i},
            )
            return response, time.perf_counter() - begin

        what = ", ".join(f"{g.model.id} at {side(g)}x{side(g)}" for g in graphs)
        progress(f"sending {len(jobs)} prompts at once ({what}; {'quick' if quick else 'default'} steps) ...")
        begin = time.perf_counter()
        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(one, jobs))
        wall = time.perf_counter() - begin

        progress(f"\n{len(jobs)} images in {wall:.1f} s")
        for graph in graphs:
            folder = out if len(graphs) == 1 else out / model_slug(graph.model.id)
            folder.mkdir(parents=True, exist_ok=True)
            mine = [(i, answer) for (g, i), answer in zip(jobs, answers, strict=True) if g is graph]
            pictures = []
            for i, (response, _) in mine:
                picture = PIL.Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))
                picture.save(folder / f"demo-{i}.png")
                pictures.append(picture)
            contact_sheet(pictures).save(folder / "contact-sheet.png")
            progress(f"{graph.model.id}: saved to {folder}/demo-*.png and {folder}/contact-sheet.png")
            progress("per-stage timings (queue wait + run time, and the most requests that shared a step):")
            for i, (response, seconds) in mine:
                stages = response.data[0].model_extra.get("stages", [])
                parts = [
                    f"{s['stage']} {s['queue_seconds']:.2f}+{s['run_seconds']:.2f} s (batch<={s['max_batch']})"
                    for s in stages
                ]
                progress(f"  [{i}] {seconds:6.1f} s  " + ", ".join(parts) + f"  {prompts[i][:40]!r}")
        return 0
    finally:
        progress("stopping ...")
        local_cluster.stop()
