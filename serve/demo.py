"""`ifserve demo`: start the local cluster, send a few prompts at once through the HTTP API with the
official `openai` client, save the images and a contact sheet, print per-stage timings, stop."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import PIL.Image

from serve.config import ServeConfig
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
        extra = dict(config.family.quick_params) if quick else {}

        def one(i: int):
            begin = time.perf_counter()
            response = client.images.generate(
                model=config.model.id,
                prompt=prompts[i],
                size=f"{size}x{size}",
                response_format="b64_json",
                extra_body={**extra, "seed": seed + i},
            )
            return response, time.perf_counter() - begin

        progress(f"sending {len(prompts)} prompts at once ({size}x{size}, {'quick' if quick else 'default'} steps) ...")
        begin = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(one, range(len(prompts))))
        wall = time.perf_counter() - begin

        out.mkdir(parents=True, exist_ok=True)
        pictures = []
        for i, (response, _) in enumerate(answers):
            picture = PIL.Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json)))
            picture.save(out / f"demo-{i}.png")
            pictures.append(picture)
        contact_sheet(pictures).save(out / "contact-sheet.png")

        progress(f"\n{len(prompts)} images in {wall:.1f} s; saved to {out}/demo-*.png and {out}/contact-sheet.png")
        progress("per-stage timings (queue wait + run time, and the most requests that shared a step):")
        for i, (response, seconds) in enumerate(answers):
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
