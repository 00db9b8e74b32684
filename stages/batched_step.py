"""One scheduler step for every task of a batch at once, bit for bit each task's own `scheduler.step`.

Diffusers' schedulers step one sample at one timestep. Called once per task, as the reference does, a
step of 16 tasks costs 16 scheduler calls, and on a GPU each of them stops the host several times
(the timestep lives on the device: `nonzero` to find the previous one, a comparison, indexing the CPU
`alphas_cumprod` with a GPU index) while the GPU waits.

Here the per-task numbers (alpha products, betas, the variance and its logs, the coefficients) are
computed on the host from each task's host timestep list, with the very expressions the scheduler uses
on its 0-dim CPU tensors, then stacked into one column per coefficient and moved to the device once
(pinned memory, non-blocking). The tensor arithmetic then runs once over the whole batch. It is
element-wise, except dynamic thresholding's quantile, which is per row, so each task's rows come out as
its own step would make them. Torch computes `tensor * cpu_scalar` by casting the scalar to the tensor's
dtype first; the columns are cast the same way. On CUDA a division by a CPU scalar is a multiplication
by its reciprocal; `_divide` does the same there.

Each task draws its variance noise from its own generator, on the CPU, in the reference's order (only
when its timestep is above 0), into pinned memory copied without blocking.

Supported: `DDPMScheduler` (every variance type, thresholding, clipping, epsilon/sample/v prediction)
and `DDIMScheduler` with eta 0 (what the pipelines use). Anything else returns None and the engine steps
task by task. Checked, not trusted: an engine compares its first batched step on each device and dtype
with the per-task steps and steps task by task for good if a bit differs (stages/engine.py);
tests/test_batched_step.py checks every supported configuration on the CPU, and on CUDA where one exists.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler

log = logging.getLogger(__name__)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device` without blocking the host: through pinned memory on CUDA."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def draw_noise(
    shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Gaussian noise exactly as diffusers' `randn_tensor` draws it with a CPU generator (on the CPU,
    then moved), but moved without blocking."""
    return to_device(torch.randn(tuple(shape), generator=generator, device="cpu", dtype=dtype), device)


@dataclass
class StepTask:
    """What a batched step needs of one task: its scheduler (a private copy), its current and previous
    timestep as host integers, its sample and model output, and its generator."""

    scheduler: object
    t: int
    prev_t: int
    sample: torch.Tensor
    model_output: torch.Tensor
    generator: torch.Generator


def previous_timesteps(scheduler, timesteps: Sequence[int]) -> list[int] | None:
    """Each timestep's predecessor as the scheduler's `step` finds it, computed once on the host;
    None when the scheduler is not one this module steps."""
    kind = _kind(scheduler)
    if kind is DDPMScheduler:
        full = [int(t) for t in scheduler.timesteps.tolist()]
        if scheduler.custom_timesteps or scheduler.num_inference_steps:  # diffusers' previous_timestep
            index = {t: full.index(t) for t in set(timesteps)}
            return [full[index[t] + 1] if index[t] < len(full) - 1 else -1 for t in timesteps]
        return [t - 1 for t in timesteps]
    if kind is DDIMScheduler:
        gap = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        return [t - gap for t in timesteps]
    return None


def _kind(scheduler) -> type | None:
    kind = type(scheduler)  # exactly these classes: a subclass may step differently
    return kind if kind in (DDPMScheduler, DDIMScheduler) else None


def supports(tasks: Sequence[StepTask]) -> bool:
    """Whether one batched step can stand for these tasks' own steps."""
    if not tasks:
        return False
    first = tasks[0].scheduler
    kind = _kind(first)
    if (
        kind is None
        or first.config.get("variance_type") == "learned"
        or any(type(t.scheduler) is not kind or t.scheduler.config != first.config for t in tasks)
    ):
        return False
    shapes = {(tuple(t.sample.shape), tuple(t.model_output.shape), t.sample.dtype, t.sample.device) for t in tasks}
    if len(shapes) != 1 or any(t.sample.shape[0] != 1 for t in tasks):
        return False
    # Torch's CPU kernels multiply and divide a reduced-precision tensor by a scalar's unrounded value:
    # there, only float32 and float64 are stepped as one (a CPU serves in float32).
    sample = tasks[0].sample
    if sample.device.type == "cpu" and sample.dtype not in (torch.float32, torch.float64):
        return False
    # An edit's scheduler copy holds its alphas on the device once `add_noise` has run (diffusers moves
    # them there), and its step then computes with device scalars: tasks step as one only alongside tasks
    # whose alphas are on the same device.
    return len({scalars_device(t.scheduler) for t in tasks}) == 1


def scalars_device(scheduler) -> torch.device:
    """Where the scheduler's per-step scalars live: the CPU, or the device after an `add_noise`."""
    return scheduler.alphas_cumprod.device


def batched_step(tasks: Sequence[StepTask], eta: float = 0.0) -> torch.Tensor:
    """The tasks' next samples, (n, C, H, W): one scheduler step each, run as one. Call only when
    `supports(tasks)`."""
    kind = _kind(tasks[0].scheduler)
    if kind is DDPMScheduler:
        return _ddpm(tasks)
    if eta != 0.0:
        raise ValueError("eta: the batched DDIM step implements eta = 0 only")
    return _ddim(tasks)


class _Columns:
    """Per-task 0-dim values (computed where each task's own step computes them) as (n, 1, 1, 1) columns
    in the batch's dtype, on its device: torch casts a 0-dim operand to the other's dtype."""

    def __init__(self, like: torch.Tensor, scalars: torch.device):
        self.like = like
        self.scalars = scalars  # where the tasks' scalars live (`scalars_device`)

    @property
    def host_scalars(self) -> bool:
        return self.scalars.type == "cpu"

    def __call__(self, values: list[torch.Tensor]) -> torch.Tensor:
        column = torch.stack([v.reshape(()).to(self.scalars) for v in values]).to(self.like.dtype)
        return to_device(column.view(-1, *([1] * (self.like.ndim - 1))), self.like.device)


def _divide(x: torch.Tensor, column: torch.Tensor, col: _Columns) -> torch.Tensor:
    """`x / scalar` as torch computes it per task: a CUDA tensor divided by a CPU scalar is x times the
    scalar's reciprocal (in the op's compute type); by a device scalar, and on the CPU, a division."""
    if x.device.type != "cuda" or not col.host_scalars:
        return x / column
    opmath = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    return (x.to(opmath) * torch.reciprocal(column.to(opmath))).to(x.dtype)


def _stack(tasks: Sequence[StepTask]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([t.sample for t in tasks]), torch.cat([t.model_output for t in tasks])


def _noise(tasks: Sequence[StepTask], like: torch.Tensor) -> torch.Tensor:
    """Each task's variance noise from its generator (zeros where its timestep is 0: no draw)."""
    host = torch.zeros(like.shape, dtype=like.dtype, pin_memory=like.device.type == "cuda")
    for i, task in enumerate(tasks):
        if task.t > 0:
            host[i : i + 1] = torch.randn((1, *like.shape[1:]), generator=task.generator, dtype=like.dtype)
    return host.to(like.device, non_blocking=True) if like.device.type == "cuda" else host


def _predicted_x0(scheduler, col: _Columns, a_t, beta_t, sample, model_output) -> torch.Tensor:
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return _divide(sample - col([b**0.5 for b in beta_t]) * model_output, col([a**0.5 for a in a_t]), col)
    if prediction == "sample":
        return model_output
    if prediction == "v_prediction":
        return col([a**0.5 for a in a_t]) * sample - col([b**0.5 for b in beta_t]) * model_output
    raise ValueError(f"prediction_type {prediction!r} is not one the batched step knows")


def _clip(scheduler, x0: torch.Tensor) -> torch.Tensor:
    if scheduler.config.thresholding:
        return scheduler._threshold_sample(x0)  # per row: a quantile of each sample
    if scheduler.config.clip_sample:
        return x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    return x0


def _ddpm(tasks: Sequence[StepTask]) -> torch.Tensor:
    s = tasks[0].scheduler
    sample, model_output = _stack(tasks)
    predicted_variance = None
    if model_output.shape[1] == sample.shape[1] * 2 and s.variance_type in ("learned", "learned_range"):
        model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)
    col = _Columns(sample, scalars_device(s))
    # Each task's scalars from its own scheduler copy, by the step's own expressions.
    a_t = [t.scheduler.alphas_cumprod[t.t] for t in tasks]
    a_prev = [t.scheduler.alphas_cumprod[t.prev_t] if t.prev_t >= 0 else t.scheduler.one for t in tasks]
    beta_t = [1 - a for a in a_t]
    beta_prev = [1 - a for a in a_prev]
    alpha = [a / p for a, p in zip(a_t, a_prev, strict=True)]
    beta = [1 - a for a in alpha]
    x0 = _clip(s, _predicted_x0(s, col, a_t, beta_t, sample, model_output))
    x0_coeff = [(p**0.5 * b) / bt for p, b, bt in zip(a_prev, beta, beta_t, strict=True)]
    sample_coeff = [a**0.5 * bp / bt for a, bp, bt in zip(alpha, beta_prev, beta_t, strict=True)]
    previous = col(x0_coeff) * x0 + col(sample_coeff) * sample
    if not any(t.t > 0 for t in tasks):
        return previous + 0  # as the reference adds its `variance = 0`
    noise = _noise(tasks, model_output)
    stepping = to_device(torch.tensor([t.t > 0 for t in tasks]).view(-1, 1, 1, 1), sample.device)
    # Where a task's timestep is 0 the reference adds a plain 0: so does this, whatever its variance says.
    return previous + torch.where(stepping, _ddpm_variance(s, tasks, col, predicted_variance, noise), 0.0)


def _ddpm_variance(s, tasks, col: _Columns, predicted_variance, noise: torch.Tensor) -> torch.Tensor:
    """The variance term of each task's step (masked out by the caller where its timestep is 0)."""
    parts = [_variance_parts(t.scheduler, t) for t in tasks]
    kind = s.variance_type
    if kind == "learned_range":
        frac = (predicted_variance + 1) / 2
        variance = frac * col([torch.log(beta) for _, beta in parts]) + (1 - frac) * col(
            [torch.log(v) for v, _ in parts]
        )
        return torch.exp(0.5 * variance) * noise
    if kind == "fixed_small_log":
        return col([torch.exp(0.5 * torch.log(v)) for v, _ in parts]) * noise
    if kind == "fixed_large":
        return col([beta**0.5 for _, beta in parts]) * noise
    if kind == "fixed_large_log":
        return col([torch.log(beta) ** 0.5 for _, beta in parts]) * noise
    return col([v**0.5 for v, _ in parts]) * noise  # fixed_small


def _variance_parts(s, task: StepTask) -> tuple[torch.Tensor, torch.Tensor]:
    """`_get_variance`'s clamped variance and current beta for the task's timestep, on the host (the
    scheduler's own method finds the previous timestep on the device). A task at timestep 0 adds no
    variance: any finite values do."""
    if task.t <= 0:
        return torch.tensor(1.0), torch.tensor(1.0)
    a_t = s.alphas_cumprod[task.t]
    a_prev = s.alphas_cumprod[task.prev_t] if task.prev_t >= 0 else s.one
    beta = 1 - a_t / a_prev
    return torch.clamp((1 - a_prev) / (1 - a_t) * beta, min=1e-20), beta


def _ddim(tasks: Sequence[StepTask]) -> torch.Tensor:
    s = tasks[0].scheduler
    sample, model_output = _stack(tasks)
    col = _Columns(sample, scalars_device(s))
    a_t = [t.scheduler.alphas_cumprod[t.t] for t in tasks]
    a_prev = [t.scheduler.alphas_cumprod[t.prev_t] if t.prev_t >= 0 else t.scheduler.final_alpha_cumprod for t in tasks]
    beta_t = [1 - a for a in a_t]
    prediction = s.config.prediction_type
    x0 = _predicted_x0(s, col, a_t, beta_t, sample, model_output)
    if prediction == "epsilon":
        epsilon = model_output
    elif prediction == "sample":
        epsilon = _divide(sample - col([a**0.5 for a in a_t]) * x0, col([b**0.5 for b in beta_t]), col)
    else:
        epsilon = col([a**0.5 for a in a_t]) * model_output + col([b**0.5 for b in beta_t]) * sample
    x0 = _clip(s, x0)
    std = [0.0 * t.scheduler._get_variance(t.t, t.prev_t) ** 0.5 for t in tasks]  # eta 0, computed as the step does
    direction = col([(1 - p - d**2) ** 0.5 for p, d in zip(a_prev, std, strict=True)]) * epsilon
    return col([p**0.5 for p in a_prev]) * x0 + direction
