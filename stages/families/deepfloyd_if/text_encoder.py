"""The frozen T5 text encoder of IF: one batched forward for many prompts, same tokenization and
output as `IFPipeline.encode_prompt` (it is that method, on the stage I pipeline loaded without UNet).
With batch invariance on, each prompt's embeddings are bit for bit those of encoding it alone."""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline

from stages.batch_invariance import row_groups
from stages.errors import InvalidParameter
from stages.task import TextEmbeddings


class T5TextEncoder:
    def __init__(self, pipe: DiffusionPipeline, batch_invariant: bool = True):
        if pipe.text_encoder is None:
            raise ValueError("the text encoder pipeline was loaded without its text_encoder")
        self.pipe = pipe
        self.batch_invariant = batch_invariant
        self.device = pipe._execution_device

    @property
    def embed_dim(self) -> int:
        return self.pipe.text_encoder.config.d_model

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
        with row_groups([1] * len(prompts), self.batch_invariant):
            cond, uncond = self.pipe.encode_prompt(
                list(prompts),
                do_classifier_free_guidance=True,
                device=self.device,
                negative_prompt=[n or "" for n in negatives],
            )
        return [TextEmbeddings(cond[i : i + 1], uncond[i : i + 1]) for i in range(len(prompts))]
