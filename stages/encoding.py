"""Text encoders: a diffusers pipeline's own `encode_prompt` as a family's `TextEncoder`, and any
`TextEncoder` as a one-step stage, so that the same scheduler, executor and loop batch its prompts,
cancel waiting ones and keep a failing prompt from failing the others in its batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline

from stages.batch_invariance import WithInvariance, invariance_mode
from stages.errors import InvalidParameter
from stages.family import TextEncoder
from stages.task import TextEmbeddings


class PipelineTextEncoder(WithInvariance):
    """A pipeline's `encode_prompt` (IF's T5, Stable Diffusion's CLIP), on the pipeline loaded without its
    denoiser: one batched forward for many prompts, same tokenization and output as the pipeline's own
    call. With batch invariance on ("split" or "per_task"), each prompt's embeddings are bit for bit those
    of encoding it alone. The embeddings leave on the host: whoever uses them next may have no GPU."""

    def __init__(self, pipe: DiffusionPipeline, batch_invariant: bool | str = True):
        if pipe.text_encoder is None:
            raise ValueError("the text encoder pipeline was loaded without its text_encoder")
        self.pipe = pipe
        self.invariance = invariance_mode(batch_invariant)
        self.device = pipe._execution_device

    @property
    def embed_dim(self) -> int:
        return self.pipe.text_encoder.get_input_embeddings().embedding_dim

    @torch.inference_mode()
    def encode(self, prompts: list[str], negative_prompts: list[str | None] | None = None) -> list[TextEmbeddings]:
        if not prompts:
            return []
        negatives = negative_prompts or [None] * len(prompts)
        if len(negatives) != len(prompts):
            raise InvalidParameter("negative_prompt", f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InvalidParameter("prompt", "must be a non-empty string")
        # "" is exactly what diffusers encodes when no negative prompt is given.
        negatives = [n or "" for n in negatives]
        if self.invariance == "per_task" and len(prompts) > 1:
            pairs = [self._encode([p], [n]) for p, n in zip(prompts, negatives, strict=True)]
            cond, uncond = torch.cat([c for c, _ in pairs]), torch.cat([u for _, u in pairs])
        else:
            with self.row_groups([1] * len(prompts)):
                cond, uncond = self._encode(list(prompts), negatives)
        cond, uncond = cond.cpu(), uncond.cpu()
        return [TextEmbeddings(cond[i : i + 1], uncond[i : i + 1]) for i in range(len(prompts))]

    def _encode(self, prompts: list[str], negatives: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pipe.encode_prompt(
            prompts,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=negatives,
        )


@dataclass(frozen=True)
class EncodeRequest:
    prompt: str
    negative_prompt: str | None = None


@dataclass(eq=False)
class EncodeTask:
    request: EncodeRequest
    result: Any = None

    @property
    def done(self) -> bool:
        return self.result is not None


class EncoderEngine:
    """`StepEngine` over a `TextEncoder`: a task's one step is its share of one batched forward."""

    def __init__(self, encoder: TextEncoder, name: str = "text_encoder"):
        self.encoder = encoder
        self.name = name

    @property
    def batch_invariant(self) -> bool:
        return self.encoder.batch_invariant

    def admit(self, requests: list[EncodeRequest]) -> list[EncodeTask]:
        for request in requests:
            if not isinstance(request.prompt, str) or not request.prompt.strip():
                raise InvalidParameter("prompt", "must be a non-empty string")
        return [EncodeTask(request) for request in requests]

    def predict(self, tasks: list[EncodeTask]) -> list[Any]:
        return self.encoder.encode([t.request.prompt for t in tasks], [t.request.negative_prompt for t in tasks])

    def advance(self, task: EncodeTask, output: Any) -> None:
        task.result = output

    def finish(self, task: EncodeTask) -> Any:
        return task.result
