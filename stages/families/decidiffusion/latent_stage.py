"""DeciDiffusion's one stage: text embeddings -> latents (U-Net-NAS, step-batched) -> VAE decode.

It reproduces the body of diffusers' `StableDiffusionPipeline.__call__` for one task, with the
pipeline's own components: the latents drawn from the task's generator and scaled by the scheduler's
initial sigma, [negative, prompt] rows under classifier-free guidance, the scheduler's step with the
pipeline's extra arguments, and the VAE decode of the final latents.
"""

from __future__ import annotations

import torch

from stages.engine import DenoisingStage
from stages.errors import InvalidParameter
from stages.task import StageRequest, Task


class LatentStage(DenoisingStage):
    latent = True

    def __init__(self, pipe, batch_invariant: bool | str = True, name: str = "denoiser"):
        super().__init__(pipe, batch_invariant, name)
        # The pipeline's default image size: the UNet's sample size in latents, times the VAE's factor.
        self.latent_size = self.unet.config.sample_size
        self.output_size = self.latent_size * pipe.vae_scale_factor

    @torch.inference_mode()
    def admit(self, requests: list[StageRequest]) -> list[Task]:
        prepared = []
        for request in requests:
            self._validate_common(request)
            if request.image is not None or request.init_image is not None:
                raise InvalidParameter("image", f"{self.name} starts from text only")
            prepared.append((request, *self._embeddings(request)))
        tasks = []
        for request, cond, uncond in prepared:
            generator = self._generator(request)
            scheduler = self._scheduler(request)
            shape = (1, self.unet.config.in_channels, self.latent_size, self.latent_size)
            latents = self._start(scheduler, scheduler.timesteps, generator, shape, cond.dtype)
            tasks.append(Task(request, generator, scheduler, scheduler.timesteps, latents, cond, uncond))
        return tasks

    def _model_input(self, task: Task) -> torch.Tensor:
        return task.scheduler.scale_model_input(task.sample, task.timestep)
