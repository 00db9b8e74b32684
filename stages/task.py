"""What moves through the stages.

A `StageRequest` is one image's work order for one stage; the engine turns it into a `Task` that holds
that request's whole sampler state (its own scheduler copy, position, sample and torch.Generator).
A finished task yields a `StageOutput`, whose image and generator state are the next stage's input:
the generator travels stage to stage exactly as the single generator of the reference code does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import PIL.Image
import torch
from diffusers import SchedulerMixin

from stages.batched_step import previous_timesteps
from stages.params import expected_steps


@dataclass
class TextEmbeddings:
    """Text embeddings of one prompt and its negative prompt, each (1, sequence, width)."""

    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor


@dataclass
class EditImages:
    """What an edit starts from: the picture (RGB, square) and, for inpainting, the mask (8-bit grey, the
    picture's size; white is repainted, black kept: diffusers' convention)."""

    image: PIL.Image.Image
    mask: PIL.Image.Image | None = None


@dataclass
class StageRequest:
    request_id: str
    steps: int
    guidance_scale: float
    timesteps: list[int] | None = None  # explicit timestep values; None: `steps` evenly spaced
    noise_level: int | None = None  # stages that noise their input image
    embeddings: TextEmbeddings | None = None  # stages that use the family's shared text embeddings
    prompt: str | None = None  # stages with their own text encoder (IF's x4 upscaler: CLIP)
    negative_prompt: str | None = None
    image: torch.Tensor | None = None  # the previous stage's output, (1, 3, h, w)
    seed: int | None = None  # the request's seed: starts the generator when there is no state ...
    generator_state: torch.Tensor | None = None  # ... the previous stage's generator, continued
    # Image-to-image and inpainting: the stage starts from `init_image` noised to the timestep `strength`
    # picks, instead of from noise; with a `mask` it keeps the picture where the mask is black.
    strength: float | None = None
    init_image: PIL.Image.Image | None = None
    mask: PIL.Image.Image | None = None

    @property
    def expected_steps(self) -> int:
        """The steps it will run (what fair share charges up front): a strength keeps the last part."""
        return expected_steps(self.steps, self.timesteps, self.strength)


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
    mask: torch.Tensor | None = None  # inpainting: 1 where the step's result is kept, 0 where x_t stays
    step_index: int = 0
    # The timesteps on the host, read once here so that no step reads the device; and each one's
    # predecessor as the scheduler's step finds it (None: a scheduler stages/batched_step.py does not know).
    host_timesteps: list = field(init=False)
    prev_timesteps: list[int] | None = field(init=False)

    def __post_init__(self) -> None:
        self.host_timesteps = self.timesteps.tolist()
        self.prev_timesteps = previous_timesteps(self.scheduler, self.host_timesteps)

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
class Presented:
    """A final picture, and what a safety checker said of it (None: no checker ran)."""

    picture: PIL.Image.Image
    nsfw_detected: bool | None = None
    watermark_detected: bool | None = None


@dataclass
class StageOutput:
    request_id: str
    image: torch.Tensor  # (1, 3, H, W) in [-1, 1]: IF stages unclamped (as their output_type="pt"), stage III clamped
    generator_state: torch.Tensor
    steps: int = 0  # denoising steps it ran
