"""The whole IF cascade in one process: T5 -> stage I (64 px) -> stage II (256 px) -> stage III (1024 px).

This is the no-Ray baseline and the library API:

    cascade = Cascade.from_checkpoints("checkpoints/tiny")
    result = cascade.generate(GenerationParams(prompt="a red bicycle", seed=1))
    result.images[1024].save("out.png")

`generate_many` runs many requests through the step-batched engine (or request-level batching).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import torch

from stages.batching import Mode, StepBatcher
from stages.engine import DenoisingStage
from stages.families import DEEPFLOYD_IF, stage_request
from stages.if_stages import StageI, StageII
from stages.images import to_pil
from stages.loading import cascade_folders, load_pipeline
from stages.params import GenerationParams
from stages.task import StageOutput, TextEmbeddings
from stages.text_encoder import T5TextEncoder
from stages.upscaler import StageIII


def load_text_encoder(path, batch_invariant: bool = True, **kw) -> T5TextEncoder:
    pipe = load_pipeline(path, expect=("IFPipeline",), exclude=("unet",), param="stage1", **kw)
    return T5TextEncoder(pipe, batch_invariant)


def load_stage(stage: str, path, batch_invariant: bool = True, **kw) -> DenoisingStage:
    """Load one denoising stage from its pipeline folder (text encoders of IF stages left out)."""
    if stage == "stage1":
        pipe = load_pipeline(path, expect=("IFPipeline",), exclude=("text_encoder",), param=stage, **kw)
        return StageI(pipe, batch_invariant)
    if stage == "stage2":
        pipe = load_pipeline(path, expect=("IFSuperResolutionPipeline",), exclude=("text_encoder",), param=stage, **kw)
        return StageII(pipe, batch_invariant)
    if stage == "stage3":
        pipe = load_pipeline(path, expect=("StableDiffusionUpscalePipeline",), param=stage, **kw)
        return StageIII(pipe, batch_invariant)
    raise ValueError(f"stage: unknown stage {stage!r}")


@dataclass
class CascadeResult:
    params: GenerationParams
    images: dict[int, PIL.Image.Image] = field(default_factory=dict)  # by size: 64, 256, 1024
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)  # same, (1, 3, H, W) in [-1, 1]

    @property
    def image(self) -> PIL.Image.Image:
        return self.images[self.params.size]


class Cascade:
    def __init__(self, text_encoder: T5TextEncoder, stages: dict[str, DenoisingStage]):
        self.text_encoder = text_encoder
        self.stages = stages

    @classmethod
    def from_checkpoints(
        cls,
        root: str | Path,
        *,
        device: str = "cpu",
        torch_dtype: torch.dtype | None = None,
        stages: tuple[str, ...] = ("stage1", "stage2", "stage3"),
        batch_invariant: bool = True,
    ) -> Cascade:
        folders = cascade_folders(root, ("stage1", *stages))
        kw = dict(device=device, torch_dtype=torch_dtype, batch_invariant=batch_invariant)
        text_encoder = load_text_encoder(folders["stage1"], **kw)
        return cls(text_encoder, {s: load_stage(s, folders[s], **kw) for s in stages})

    def set_batch_invariant(self, on: bool) -> None:
        """Batch invariance for the text encoder and every stage (stages/batch_invariance.py)."""
        self.text_encoder.batch_invariant = on
        for stage in self.stages.values():
            stage.batch_invariant = on

    def generate(self, params: GenerationParams) -> CascadeResult:
        return self.generate_many([params])[0]

    def generate_many(
        self,
        requests: list[GenerationParams],
        *,
        mode: Mode = "step",
        max_batch_size: int = 8,
        on_stage_done: Callable[[str], None] = lambda stage: None,
    ) -> list[CascadeResult]:
        """Run requests stage by stage; within a stage they share batched steps."""
        results = [CascadeResult(p) for p in requests]
        embeddings: list[TextEmbeddings] = self.text_encoder.encode(
            [p.prompt for p in requests], [p.negative_prompt for p in requests]
        )
        previous: dict[int, StageOutput] = {}
        for spec in DEEPFLOYD_IF.stages:
            todo = [i for i, p in enumerate(requests) if spec in DEEPFLOYD_IF.stages_for(p.size)]
            if not todo:
                break
            if spec.name not in self.stages:
                raise ValueError(f"size: this cascade was loaded without {spec.name}, needed for {spec.output_size} px")
            batcher = StepBatcher(self.stages[spec.name], max_batch_size=max_batch_size, mode=mode)
            for i in todo:
                batcher.submit(
                    stage_request(spec, str(i), requests[i], embeddings=embeddings[i], previous=previous.get(i))
                )
            outputs = {int(o.request_id): o for o in batcher.run_until_idle()}
            for i, output in outputs.items():
                results[i].tensors[spec.output_size] = output.image
                results[i].images[spec.output_size] = to_pil(output.image)
            previous = outputs
            on_stage_done(spec.name)
        return results
