"""The step-batched denoising engine shared by the three stages.

`step(tasks)` advances every task by one denoising step with ONE batched UNet call. Tasks may sit at
different timesteps (a per-sample timestep tensor), use different guidance scales, step counts,
timestep lists and noise levels. The UNet batch is laid out as
    [negative rows of the guided tasks] + [prompt rows of all tasks]
so a task with guidance <= 1 costs one row, as in diffusers. Guidance and scheduler arithmetic then
run per task, on that task's own scheduler copy and generator, in the same order as the reference
pipeline; only the UNet call is shared.
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from stages.errors import InvalidParameter
from stages.params import MAX_STEPS, TIMESTEP_LISTS
from stages.task import StageOutput, StageRequest, Task


class DenoisingStage(ABC):
    name: str  # "stage1" / "stage2" / "stage3": the prefix of this stage's request parameters

    def __init__(self, pipe: DiffusionPipeline):
        self.pipe = pipe
        self.unet = pipe.unet
        self.device = pipe.unet.device
        self.dtype = pipe.unet.dtype
        self.unet_calls = 0

    # ---- per-stage hooks -------------------------------------------------------------------
    @abstractmethod
    def admit(self, requests: list[StageRequest]) -> list[Task]:
        """Validate requests and prepare their tasks: initial noise, conditioning, scheduler."""

    @abstractmethod
    def _model_input(self, task: Task) -> torch.Tensor:
        """The task's UNet input rows for its current timestep (before CFG duplication)."""

    @abstractmethod
    def _guide(self, task: Task, uncond: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        """Combine the task's UNet outputs into the model output its scheduler steps with."""

    def finish(self, task: Task) -> StageOutput:
        return StageOutput(
            task.request_id, task.sample, task.generator.get_state(), task.step_index, task.unet_batch_sizes
        )

    # ---- the batched step ------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tasks: list[Task]) -> None:
        if not tasks:
            return
        guided = [i for i, t in enumerate(tasks) if t.guided]
        uncond_row = {task_index: row for row, task_index in enumerate(guided)}
        rows = [tasks[i] for i in guided] + tasks
        inputs = [self._model_input(t) for t in tasks]
        model_input = torch.cat([inputs[i] for i in guided] + inputs)
        timesteps = torch.stack([t.timestep for t in rows]).to(self.device)
        hidden = torch.cat([t.uncond for t in rows[: len(guided)]] + [t.cond for t in tasks])
        class_labels = None
        if tasks[0].class_label is not None:
            class_labels = torch.cat([t.class_label for t in rows])

        out = self.unet(
            model_input, timesteps, encoder_hidden_states=hidden, class_labels=class_labels, return_dict=False
        )[0]
        self.unet_calls += 1

        for i, task in enumerate(tasks):
            text = out[len(guided) + i : len(guided) + i + 1]
            uncond = out[uncond_row[i] : uncond_row[i] + 1] if task.guided else None
            model_output = self._guide(task, uncond, text)
            extra = self.pipe.prepare_extra_step_kwargs(task.generator, 0.0)
            task.sample = task.scheduler.step(model_output, task.timestep, task.sample, **extra, return_dict=False)[0]
            task.step_index += 1
            task.unet_batch_sizes.append(len(tasks))

    @torch.inference_mode()
    def run(self, requests: list[StageRequest]) -> list[StageOutput]:
        """Request-level batching: admit all requests together and step until the last finishes."""
        tasks = self.admit(requests)
        running = list(tasks)
        while running:
            self.step(running)
            running = [t for t in running if not t.done]
        return [self.finish(t) for t in tasks]

    # ---- shared helpers for admit() -----------------------------------------------------------
    def _param(self, field: str) -> str:
        return f"{self.name}_{field}"

    def _validate_common(self, request: StageRequest) -> None:
        if not isinstance(request.steps, int) or not 1 <= request.steps <= MAX_STEPS:
            raise InvalidParameter(
                self._param("steps"), f"must be an integer in [1, {MAX_STEPS}], got {request.steps!r}"
            )
        g = request.guidance_scale
        if not isinstance(g, int | float) or not math.isfinite(g) or g < 0:
            raise InvalidParameter(self._param("guidance"), f"must be a finite number >= 0, got {g!r}")
        if request.noise_level is not None and not 0 <= request.noise_level < 1000:
            raise InvalidParameter(self._param("noise_level"), f"must be in [0, 1000), got {request.noise_level!r}")

    def _generator(self, request: StageRequest) -> torch.Generator:
        generator = torch.Generator()
        if request.generator_state is not None:
            generator.set_state(request.generator_state)
        elif request.seed is not None:
            generator.manual_seed(request.seed)
        else:
            raise InvalidParameter("seed", f"{self.name} needs a seed or the previous stage's generator state")
        return generator

    def _scheduler(self, request: StageRequest):
        """A private copy of the pipeline's scheduler with this request's timesteps set."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        timesteps = request.timesteps
        if isinstance(timesteps, str):
            if timesteps not in TIMESTEP_LISTS:
                raise InvalidParameter(
                    self._param("timesteps"),
                    f"unknown timestep list {timesteps!r}; known: {', '.join(sorted(TIMESTEP_LISTS))}",
                )
            timesteps = TIMESTEP_LISTS[timesteps]
        if timesteps is not None:
            try:
                scheduler.set_timesteps(timesteps=list(timesteps), device=self.device)
            except (ValueError, TypeError) as err:
                raise InvalidParameter(self._param("timesteps"), str(err)) from None
        else:
            scheduler.set_timesteps(request.steps, device=self.device)
        train_steps = scheduler.config.num_train_timesteps
        if len(scheduler.timesteps) == 0 or not 0 <= int(scheduler.timesteps.max()) < train_steps:
            # e.g. DDIM with steps_offset=1 and 1000 steps asks for t=1000: refuse here, not deep in step().
            raise InvalidParameter(
                self._param("timesteps" if timesteps is not None else "steps"),
                f"gives timesteps outside [0, {train_steps}) for this {type(scheduler).__name__}",
            )
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return scheduler

    def _noise(self, shape, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """Gaussian noise from the task's generator (CPU), as diffusers' `randn_tensor` draws it."""
        return randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)

    def _check_image(self, request: StageRequest, channels: int = 3) -> torch.Tensor:
        image = request.image
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[:2] != (1, channels):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InvalidParameter("image", f"{self.name} expects a (1, {channels}, H, W) tensor, got {shape}")
        return image
