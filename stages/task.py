"""What moves through the stages.

A `StageRequest` is one image's work order for one stage; the engine turns it into a `Task` that holds
that request's whole sampler state (its own scheduler copy, position, sample and torch.Generator).
A finished task yields a `StageOutput`, whose image and generator state are the next stage's input:
the generator travels stage to stage exactly as the single generator of the reference code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import SchedulerMixin


@dataclass
class TextEmbeddings:
    """T5 embeddings of one prompt and its negative prompt, each (1, 77, d_model)."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor


@dataclass
class StageRequest:
    request_id: str
    steps: int
    guidance_scale: float
    timesteps: str | list[int] | None = None  # a named list (fast27, smart50, ...) or explicit values
    noise_level: int | None = None  # stages II and III
    embeddings: TextEmbeddings | None = None  # stages I and II
    prompt: str | None = None  # stage III encodes with its own CLIP text encoder
    negative_prompt: str | None = None
    image: torch.Tensor | None = None  # stages II and III: previous stage's output, (1, 3, h, w)
    seed: int | None = None  # stage I starts the generator from the seed ...
    generator_state: torch.Tensor | None = None  # ... later stages continue it


@dataclass(eq=False)  # identity semantics: tasks hold tensors
class Task:
    request: StageRequest
    generator: torch.Generator
    scheduler: SchedulerMixin
    timesteps: torch.Tensor
    sample: torch.Tensor  # x_t, (1, C, H, W)
    cond: torch.Tensor  # encoder hidden states of the prompt
    uncond: torch.Tensor | None  # ... of the negative prompt; None when guidance is off
    image_cond: torch.Tensor | None = None  # concatenated to the UNet input (noised low-res image)
    class_label: torch.Tensor | None = None  # noise level fed as the UNet's class label
    step_index: int = 0
    cancelled: bool = False
    step_batch_sizes: list[int] = field(default_factory=list)  # requests sharing each of its steps

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def guided(self) -> bool:
        return self.uncond is not None

    @property
    def done(self) -> bool:
        return self.step_index >= len(self.timesteps)

    @property
    def timestep(self) -> torch.Tensor:
        return self.timesteps[self.step_index]


@dataclass
class StageOutput:
    request_id: str
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]: IF stages unclamped (as their output_type="pt"), stage III clamped
    generator_state: torch.Tensor
    steps: int = 0  # denoising steps it ran
    step_batch_sizes: list[int] = field(default_factory=list)  # requests sharing each of its steps
