"""The step-batched denoising engine that diffusers UNet stages share (IF's three, and any family's).

One step is two phases, so that a failure in one can be pinned on the tasks it concerns:
`predict(tasks)` is the batched UNet call (plus guidance), pure, so it can be retried task by task;
`advance(task, model_output)` is one task's scheduler step, which draws from the task's generator.
`step(tasks)` does both: it advances every task by one denoising step with one batched UNet call (plus one for each
task without guidance while batch invariance is on, see below). Tasks may sit at
different timesteps (a per-sample timestep tensor), use different guidance scales, step counts,
timestep lists and noise levels. Each task puts its rows into the batch as the reference pipeline lays
out its own batch: [negative, prompt] under classifier-free guidance, [prompt] alone without. Guidance
and scheduler arithmetic then run per task, on that task's own scheduler copy and generator, in the same
order as the reference pipeline; only the UNet call is shared.

Batch invariance (on by default): the UNet call runs under `RowGroups`, so each guided task's rows come
out bit for bit as in the reference's own call (see `stages/batch_invariance.py`). A task without
guidance is a single row, which cannot be split off: in the UNet some one-row tensors take their memory
layout from views that exist only when the batch is 1 (a slice of a larger batch keeps other strides,
and group norm picks its kernel by them), so such a task gets a UNet call of its own.
The mode is per stage (`invariance`, stages/batch_invariance.py): "split" as above; "per_task" gives
every task a UNet call of its own at the reference's shape; "off" runs everything in one plain batched
call: faster where kernels gain from batch size, with results a few 1e-3 at most from the reference.

Around the UNet call nothing waits on the device: timesteps live on the host (one list per task, read
once at admission), guidance runs once over the call's tasks, and `advance_batch` steps every task with one
batched scheduler step (stages/batched_step.py), bit for bit each task's own. Noise is drawn on the CPU
from each task's generator, as the reference draws it, and reaches the device without blocking. A finished
task's output leaves on the host (`finish`): the next stage, or the ingress, may have no GPU.
"""

from __future__ import annotations

import copy
import logging
import math
from abc import ABC, abstractmethod

import PIL.Image
import torch
from diffusers import DiffusionPipeline

from stages.batch_invariance import WithInvariance, invariance_mode
from stages.batched_step import StepTask, batched_step, draw_noise, scalars_device, supports, to_device
from stages.errors import InvalidParameter
from stages.images import to_pil
from stages.params import MAX_STEPS
from stages.task import Presented, StageOutput, StageRequest, Task, TextEmbeddings

log = logging.getLogger(__name__)


class DenoisingStage(WithInvariance, ABC):
    """A diffusers UNet stage; it implements `stages.family.StepEngine`."""

    latent = False  # its samples are VAE latents, decoded when a task finishes (`_decode`)

    def __init__(self, pipe: DiffusionPipeline, batch_invariant: bool | str = True, name: str = "stage"):
        self.name = name  # the stage's name in its family: the prefix of its request parameters
        self.pipe = pipe
        self.invariance = invariance_mode(batch_invariant)
        self.batched_steps = 0  # scheduler steps run as one over several tasks (`advance_batch`)
        # (what, device type, dtype) -> whether running it as one gave the per-task bits (`_checked`)
        self._vectorised: dict[tuple, bool] = {}
        self.unet = pipe.unet
        self.device = pipe._execution_device  # the GPU under model CPU offload, else where the UNet is
        self.dtype = pipe.unet.dtype
        self.unet_calls = 0
        # Final pictures pass through this (a family's safety checker and watermark), when one is set.
        self.safety = None
        self.watermark_size: int | None = None  # what the family's pipelines pass to the watermarker

    # ---- per-stage hooks -------------------------------------------------------------------
    @abstractmethod
    def admit(self, requests: list[StageRequest]) -> list[Task]:
        """Validate requests and prepare their tasks: initial noise, conditioning, scheduler."""

    @abstractmethod
    def _model_input(self, task: Task) -> torch.Tensor:
        """The task's UNet input rows for its current timestep (before CFG duplication)."""

    def _guide(self, tasks: list[Task], uncond: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        """Combine the UNet outputs of tasks (all guided, or none) into the model outputs their schedulers
        step with, one row each: classifier-free guidance as Stable Diffusion's pipelines apply it, each
        task with its own scale (IF's pixel stages keep the learned variance)."""
        if uncond is None:
            return text
        key = ("guidance", text.device.type, text.dtype)
        if key not in self._vectorised:
            self._checked(key, *_guidance_both_ways(text))
        if not self._vectorised[key]:
            return _guided([t.request.guidance_scale for t in tasks], uncond, text)
        return uncond + _scales(tasks, text) * (text - uncond)

    def _checked(self, key: tuple, together: torch.Tensor, alone: torch.Tensor) -> bool:
        """The first time a vectorised computation runs on this device and dtype, it must give the
        per-task results bit for bit; if not, this engine computes that part task by task from now on."""
        self._vectorised[key] = same = _same_bits(together, alone)
        if not same:
            log.warning("%s: %s run as one differs from task by task (%s): task by task", self.name, key[0], key[1:])
        return same

    @property
    def finish_apart(self) -> bool:
        """Whether a stage loop on a thread of its own may finish tasks beside the step
        (stages/stage_loop.py): not under model CPU offload, whose hooks would move the UNet off the
        device while it steps, when the VAE is called."""
        return not getattr(self.pipe, "_all_hooks", None)

    @torch.inference_mode()
    def finish(self, task: Task) -> StageOutput:
        """The task's output, on the host: its sample, or for a latent stage the sample through the VAE."""
        image = self._decode(task.sample) if self.latent else task.sample
        return StageOutput(task.request_id, image.cpu(), task.generator.get_state(), task.step_index)

    def present(self, image: torch.Tensor) -> Presented:
        """A final image of this stage as the picture a client gets: through the safety checker and
        watermark when the stage has them. Runs beside the step loop, never inside a step."""
        if self.safety is None:
            return Presented(to_pil(image))
        return self.safety.present(image, self.watermark_size)

    @property
    def embed_dim(self) -> int:
        config = self.unet.config
        return config.encoder_hid_dim or config.cross_attention_dim

    def _embeddings(self, request: StageRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The family's text embeddings of the request, checked and on this stage's device and dtype: the
        prompt's, and the negative prompt's only under guidance (guidance > 1, as diffusers decides)."""
        emb = request.embeddings
        if not isinstance(emb, TextEmbeddings):
            raise InvalidParameter("embeddings", f"{self.name} needs the text encoder's TextEmbeddings")
        for field, tensor in (("prompt_embeds", emb.prompt_embeds), ("negative_prompt_embeds", emb.negative_embeds)):
            if (
                not isinstance(tensor, torch.Tensor)
                or tensor.ndim != 3
                or tensor.shape[0] != 1
                or (tensor.shape[2] != self.embed_dim)
            ):
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise InvalidParameter(field, f"expected shape (1, sequence, {self.embed_dim}), got {shape}")
        if emb.negative_embeds.shape != emb.prompt_embeds.shape:
            raise InvalidParameter(
                "negative_prompt_embeds",
                f"shape {tuple(emb.negative_embeds.shape)} differs from prompt_embeds {tuple(emb.prompt_embeds.shape)}",
            )
        cond = to_device(emb.prompt_embeds, self.device).to(self.dtype)
        guided = request.guidance_scale > 1.0  # diffusers: do_classifier_free_guidance
        return cond, to_device(emb.negative_embeds, self.device).to(self.dtype) if guided else None

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents through the pipeline's VAE to an image in [-1, 1], clamped as its postprocessing does."""
        vae = self.pipe.vae
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
        image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return image.clamp(-1.0, 1.0)

    # ---- the batched step ------------------------------------------------------------------
    @torch.inference_mode()
    def predict(self, tasks: list[Task]) -> list[torch.Tensor]:
        """The model output each task's scheduler steps with, from one batched UNet call (see above
        for the calls batch invariance adds). Changes no task."""
        outputs: dict[int, torch.Tensor] = {}
        for shared in self._unet_batches(tasks):
            out = self._unet_call(shared)
            # Guidance once for the call's guided tasks (rows [negative, prompt] each), once for the others.
            for group in ([t for t in shared if t.guided], [t for t in shared if not t.guided]):
                if not group:
                    continue
                rows = torch.cat([out[i] for i, t in enumerate(shared) if t in group])
                if group[0].guided:
                    guided = self._guide(group, rows[0::2], rows[1::2])
                else:
                    guided = self._guide(group, None, rows)
                for task, row in zip(group, guided.split(1), strict=True):
                    outputs[id(task)] = row
        return [outputs[id(task)] for task in tasks]

    @torch.inference_mode()
    def advance(self, task: Task, model_output: torch.Tensor) -> None:
        """One scheduler step of one task, in the reference's order, on its own scheduler and generator."""
        extra = self.pipe.prepare_extra_step_kwargs(task.generator, 0.0)
        step = task.scheduler.step(model_output, task.timestep, task.sample, **extra, return_dict=False)
        self._advanced(task, step[0])

    @torch.inference_mode()
    def advance_batch(self, tasks: list[Task], model_outputs: list[torch.Tensor]) -> bool:
        """One scheduler step of every task, run as one (stages/batched_step.py): the same samples and the
        same draws from each generator as `advance` on each. False, changing nothing, where it cannot
        (one task, or a scheduler it does not know); a raise also leaves every task as it was."""
        steps = [
            StepTask(
                t.scheduler, t.host_timesteps[t.step_index], t.prev_timesteps[t.step_index], t.sample, out, t.generator
            )
            for t, out in zip(tasks, model_outputs, strict=True)
            if t.prev_timesteps is not None
        ]
        if len(tasks) < 2 or len(steps) < len(tasks) or not supports(steps):
            return False
        # Checked per device and dtype, and per place of the scalars (an edit's sit on the device).
        where = scalars_device(tasks[0].scheduler).type
        key = ("scheduler step", tasks[0].sample.device.type, tasks[0].sample.dtype, f"scalars on {where}")
        if self._vectorised.get(key) is False:
            return False
        states = [t.generator.get_state() for t in tasks]
        alone = None if key in self._vectorised else self._steps_alone(tasks, model_outputs)
        try:
            samples = batched_step(steps, eta=0.0)
        except BaseException:
            for task, state in zip(tasks, states, strict=True):
                task.generator.set_state(state)  # the draws it made are taken back
            raise
        if alone is not None and not self._checked(key, samples, alone):
            samples = alone  # the same draws were made: the generators are where the reference leaves them
        # Every new sample is made before any task changes, so a raise here also leaves them as they were.
        try:
            new = [self._blended(task, sample) for task, sample in zip(tasks, samples.split(1), strict=True)]
        except BaseException:
            for task, state in zip(tasks, states, strict=True):
                task.generator.set_state(state)
            raise
        self.batched_steps += 1
        for task, sample in zip(tasks, new, strict=True):
            task.sample = sample
            task.step_index += 1
        return True

    def _steps_alone(self, tasks: list[Task], model_outputs: list[torch.Tensor]) -> torch.Tensor:
        """Each task's own scheduler step on a copy of its generator (the check of the first batched step)."""
        samples = []
        for task, model_output in zip(tasks, model_outputs, strict=True):
            generator = torch.Generator()
            generator.set_state(task.generator.get_state())
            extra = self.pipe.prepare_extra_step_kwargs(generator, 0.0)
            samples.append(task.scheduler.step(model_output, task.timestep, task.sample, **extra, return_dict=False)[0])
        return torch.cat(samples)

    def _advanced(self, task: Task, sample: torch.Tensor) -> None:
        task.sample = self._blended(task, sample)
        task.step_index += 1

    @staticmethod
    def _blended(task: Task, sample: torch.Tensor) -> torch.Tensor:
        if task.mask is None:
            return sample
        # inpainting: outside the mask x_t stays what it was (diffusers' inpainting pipelines)
        return (1 - task.mask) * task.sample + task.mask * sample

    def step(self, tasks: list[Task]) -> None:
        outputs = self.predict(tasks)
        if not self.advance_batch(tasks, outputs):
            for task, model_output in zip(tasks, outputs, strict=True):
                self.advance(task, model_output)

    def _unet_batches(self, tasks: list[Task]) -> list[list[Task]]:
        """Which tasks share a UNet call in this step."""
        if self.invariance == "off":
            return [tasks] if tasks else []
        if self.invariance == "per_task":
            return [[t] for t in tasks]
        guided = [t for t in tasks if t.guided]
        return ([guided] if guided else []) + [[t] for t in tasks if not t.guided]

    def _unet_call(self, tasks: list[Task]) -> tuple[torch.Tensor, ...]:
        """One UNet call over the tasks' rows; returns each task's output rows."""
        rows = [2 if t.guided else 1 for t in tasks]

        def per_row(values: list) -> list:  # a task's value once for each of its rows
            return [v for v, n in zip(values, rows, strict=True) for _ in range(n)]

        model_input = torch.cat(per_row([self._model_input(t) for t in tasks]))
        # The timesteps from the host lists: no read of a device tensor.
        timesteps = torch.tensor(
            per_row([t.host_timesteps[t.step_index] for t in tasks]), dtype=tasks[0].timesteps.dtype
        )
        hidden = torch.cat([h for t in tasks for h in ([t.uncond, t.cond] if t.guided else [t.cond])])
        class_labels = None
        if tasks[0].class_label is not None:
            class_labels = torch.cat(per_row([t.class_label for t in tasks]))
        with self.row_groups(rows):
            out = self.unet(
                model_input,
                to_device(timesteps, self.device),
                encoder_hidden_states=hidden,
                class_labels=class_labels,
                return_dict=False,
            )[0]
        self.unet_calls += 1
        return out.split(rows)

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
            try:
                generator.set_state(request.generator_state)
            except (RuntimeError, TypeError) as err:
                raise InvalidParameter("generator_state", str(err)) from None
        elif request.seed is not None:
            generator.manual_seed(request.seed)
        else:
            raise InvalidParameter("seed", f"{self.name} needs a seed or the previous stage's generator state")
        return generator

    def _scheduler(self, request: StageRequest):
        """A private copy of the pipeline's scheduler with this request's timesteps set."""
        scheduler = copy.deepcopy(self.pipe.scheduler)
        timesteps = request.timesteps
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

    def _timesteps(self, scheduler, request: StageRequest) -> torch.Tensor:
        """The timesteps the task runs: all of them, or with a `strength` the last `int(n * strength)`
        (diffusers' `get_timesteps` in its image-to-image and inpainting pipelines)."""
        if request.strength is None:
            return scheduler.timesteps
        n = len(scheduler.timesteps) // scheduler.order
        kept = min(int(n * request.strength), n)
        if kept < 1:
            raise InvalidParameter(
                self._param("strength"),
                f"{request.strength} of {n} steps leaves no step to run: raise the strength or the steps",
            )
        start = (n - kept) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return scheduler.timesteps[start:]

    def _start(
        self,
        scheduler,
        timesteps: torch.Tensor,
        generator: torch.Generator,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        image: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The task's first sample, drawing from its generator as the reference does: pure noise
        (text-to-image), or `image` noised to the first timestep (image-to-image), kept as it is outside
        `mask` (inpainting)."""
        if image is None:
            return self._noise(shape, generator, dtype) * scheduler.init_noise_sigma
        # diffusers' preprocessing leaves the picture channels-last in memory and its pipelines copy it to
        # contiguous (repeat_interleave per image); the UNet's kernels differ in the last bits between them.
        image = image.contiguous()
        noised = scheduler.add_noise(image, self._noise(image.shape, generator, dtype), timesteps[:1])
        return noised if mask is None else (1 - mask) * image + mask * noised

    def _check_edit(self, request: StageRequest) -> None:
        """An edit's inputs: a square picture, a mask of its size, a strength in (0, 1] that needs them."""
        image, mask, strength = request.init_image, request.mask, request.strength
        if image is None:
            if mask is not None or strength is not None:
                raise InvalidParameter("image", f"{self.name}: a mask or strength needs the image to edit")
            return
        if not isinstance(image, PIL.Image.Image):
            raise InvalidParameter("image", f"{self.name} expects a picture, got {type(image).__name__}")
        if image.width != image.height:
            raise InvalidParameter("image", f"must be square, got {image.width}x{image.height}")
        if mask is not None:
            if not isinstance(mask, PIL.Image.Image):
                raise InvalidParameter("mask", f"{self.name} expects a picture, got {type(mask).__name__}")
            if mask.size != image.size:
                raise InvalidParameter(
                    "mask", f"is {mask.width}x{mask.height}, the image {image.width}x{image.height}: they must match"
                )
        if strength is None or not isinstance(strength, int | float) or not 0 < strength <= 1:
            raise InvalidParameter(self._param("strength"), f"must be in (0, 1] for an edit, got {strength!r}")

    def _noise(self, shape, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
        """Gaussian noise from the task's generator (CPU), as diffusers' `randn_tensor` draws it."""
        return draw_noise(shape, generator, dtype, self.device)

    def _check_image(self, request: StageRequest, channels: int = 3) -> torch.Tensor:
        image = request.image
        if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[:2] != (1, channels):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise InvalidParameter("image", f"{self.name} expects a (1, {channels}, H, W) tensor, got {shape}")
        return image


def _guided(scales: list[float], uncond: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance row by row, each with its Python scale: the reference's arithmetic."""
    return torch.cat([u + g * (x - u) for g, u, x in zip(scales, uncond.split(1), text.split(1), strict=True)])


def _guidance_both_ways(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Guidance on made-up rows of `like`'s dtype and device, with scales no float16 holds exactly, run
    as one and row by row: whether this device rounds a column of scales as it rounds a Python scale."""
    scales = [7.3, 4.1, 1.7, 13.37]
    g = torch.Generator().manual_seed(0)
    uncond, text = (to_device(torch.randn(4, 3, 8, 8, generator=g), like.device).to(like.dtype) for _ in range(2))
    column = torch.tensor(scales, dtype=torch.float64).to(like.dtype).view(-1, 1, 1, 1)
    return uncond + to_device(column, like.device) * (text - uncond), _guided(scales, uncond, text)


def _scales(tasks: list[Task], like: torch.Tensor) -> torch.Tensor:
    """The tasks' guidance scales as a column in `like`'s dtype and device (torch casts a Python scale
    to the tensor's dtype when it multiplies one task's rows: so does this for all of them)."""
    scales = torch.tensor([t.request.guidance_scale for t in tasks], dtype=torch.float64).to(like.dtype)
    return to_device(scales.view(-1, *([1] * (like.ndim - 1))), like.device)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (NaNs included, which `torch.equal` calls unequal)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)
