"""A family's whole cascade in one process (DeepFloyd IF by default: T5 -> stage I (64 px) -> stage II
(256 px) -> stage III (1024 px)). This is the no-Ray baseline and the library API:

    cascade = Cascade.from_checkpoints("checkpoints/tiny")
    result = cascade.generate(cascade.params(prompt="a red bicycle", seed=1))
    result.image.save("out.png")

`generate_many` walks every request through the graph (`stages/graph.py`, the walk the server uses),
each stage driven by its own scheduler and loop (`stages/stage_loop.py`), all on this thread: requests
share each stage's batched steps, and the stages take turns step by step, so a request can be in stage
III while others are still in stage I. A request that fails gets its error; the others go on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from stages.encoding import EncoderEngine, EncodeRequest
from stages.errors import InvalidParameter
from stages.families import DEFAULT_FAMILY, get_family
from stages.family import TEXT_TO_IMAGE, ModelFamily, StageSpec, StepEngine, TextEncoder
from stages.graph import walk
from stages.images import to_pil
from stages.params import RequestParams
from stages.scheduler import Mode, StageScheduler
from stages.stage_loop import StageLoop
from stages.task import EditImages, StageOutput


@dataclass
class CascadeResult:
    params: RequestParams
    images: dict[int, PIL.Image.Image] = field(default_factory=dict)  # by size, e.g. 64, 256, 1024
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)  # same, (1, 3, H, W) in [-1, 1]
    error: Exception | None = None  # why this request failed (InvalidParameter, StageFailure), if it did
    # What the safety checker said of the final image (None: the cascade runs without one).
    nsfw_detected: bool | None = None
    watermark_detected: bool | None = None

    @property
    def image(self) -> PIL.Image.Image:
        if self.error is not None:
            raise self.error
        return self.images[self.params.size]


class Cascade:
    def __init__(self, family: ModelFamily, text_encoder: TextEncoder, stages: dict[str, StepEngine]):
        self.family = family
        self.text_encoder = text_encoder
        self.stages = stages

    @classmethod
    def from_checkpoints(
        cls,
        root: str | Path,
        *,
        family: ModelFamily | str = DEFAULT_FAMILY,
        device: str = "cpu",
        torch_dtype: torch.dtype | None = None,
        stages: tuple[str, ...] | None = None,
        batch_invariant: bool = True,
        safety_checker: bool = False,
    ) -> Cascade:
        """Load the text encoder and `stages` (default: all of the family's) from `root`; with
        `safety_checker`, final images pass the family's safety checker and watermark."""
        family = get_family(family) if isinstance(family, str) else family
        if safety_checker:
            family.check_option("safety_checker")
        names = stages or tuple(s.name for s in family.stages)
        kw = dict(device=device, torch_dtype=torch_dtype, batch_invariant=batch_invariant)
        family.checkpoint_folders(root, [family.encoder_folder, *(family.stage(n).folder for n in names)])
        encoder = family.load_encoder_from(root, **kw)
        safety = {"safety_checker": True} if safety_checker else {}
        return cls(family, encoder, {name: family.load_stage(name, root, **kw, **safety) for name in names})

    def params(self, kind: str = TEXT_TO_IMAGE, **fields: Any) -> RequestParams:
        """The family's request parameters for a kind of task (text-to-image, or an edit kind such as
        image-to-image and inpainting); raises InvalidParameter naming the first bad field."""
        return self.family.kind(kind).params.parse(**fields)

    def set_batch_invariant(self, on: bool) -> None:
        """Batch invariance for the text encoder and every stage (stages/batch_invariance.py)."""
        self.text_encoder.batch_invariant = on
        for stage in self.stages.values():
            stage.batch_invariant = on

    def generate(self, params: RequestParams, edit: EditImages | None = None) -> CascadeResult:
        """One image (an edit of `edit`'s picture for an edit kind's params); raises what made it fail."""
        result = self.generate_many([params], edits=[edit])[0]
        if result.error is not None:
            raise result.error
        return result

    def generate_many(
        self,
        requests: list[RequestParams],
        *,
        mode: Mode = "step",
        max_batch_size: int = 8,
        on_stage_done: Callable[[str], None] = lambda stage: None,
        edits: list[EditImages | None] | None = None,
    ) -> list[CascadeResult]:
        """Every request through the cascade, sharing batched steps; failed ones carry their `error`.
        `edits[i]` is what request i edits (None for text-to-image)."""
        edits = edits or [None] * len(requests)
        if len(edits) != len(requests):
            raise InvalidParameter("edits", f"one per request: {len(edits)} for {len(requests)} requests")
        return asyncio.run(self._generate_many(requests, edits, mode, max_batch_size, on_stage_done))

    async def _generate_many(self, requests, edits, mode, max_batch_size, on_stage_done) -> list[CascadeResult]:
        encoder = StageLoop(EncoderEngine(self.text_encoder), StageScheduler(max_batch_size))
        loops = {name: StageLoop(engine, StageScheduler(max_batch_size, mode)) for name, engine in self.stages.items()}
        drivers = [asyncio.create_task(_drive(loop)) for loop in (encoder, *loops.values())]
        results = [CascadeResult(p) for p in requests]

        async def one(index: int, result: CascadeResult, edit: EditImages | None) -> None:
            request_id = str(index)

            async def encode(params: RequestParams) -> Any:
                embeddings, _ = await encoder.run(request_id, EncodeRequest(params.prompt, params.negative_prompt))
                return embeddings

            async def run_stage(spec: StageSpec, params: RequestParams, embeddings, previous) -> StageOutput:
                if spec.name not in loops:
                    raise InvalidParameter("size", f"this cascade was loaded without {spec.name}")
                request = self.family.stage_request(
                    spec, request_id, params, embeddings=embeddings, previous=previous, edit=edit
                )
                output, _ = await loops[spec.name].run(request_id, request)
                result.tensors[spec.output_size] = output.image
                if spec.output_size == params.size:  # the final image, as a client gets it
                    presented = self.stages[spec.name].present(output.image)
                    result.images[spec.output_size] = presented.picture
                    result.nsfw_detected = presented.nsfw_detected
                    result.watermark_detected = presented.watermark_detected
                else:
                    result.images[spec.output_size] = to_pil(output.image)
                on_stage_done(spec.name)
                return output

            try:
                await walk(self.family, result.params, encode=encode, run_stage=run_stage)
            except Exception as err:  # noqa: BLE001 - this request's answer; the others go on
                result.error = err

        try:
            await asyncio.gather(*(one(i, r, e) for i, (r, e) in enumerate(zip(results, edits, strict=True))))
        finally:
            for driver in drivers:
                driver.cancel()
        return results


async def _drive(loop: StageLoop) -> None:
    """Step a stage loop from this event loop: one step, then let the others and the callers run."""
    try:
        while True:
            loop.iterate()
            await asyncio.sleep(0)
    except Exception as err:  # noqa: BLE001 - the loop cannot go on: its callers get the error
        loop.abort(err)
