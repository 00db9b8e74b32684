"""Stage III: Stability's x4 upscaler (256 -> 1024 px), as in `StableDiffusionUpscalePipeline`.

It encodes prompts with its own CLIP text encoder (batched over the tasks being admitted), noises the
low-res image with the low-res scheduler, denoises 4-channel latents and decodes them with the VAE.
"""

from __future__ import annotations

import torch

from stages.engine import DenoisingStage
from stages.errors import InvalidParameter
from stages.task import StageRequest, Task


class StageIII(DenoisingStage):
    latent = True  # the final stage's output is the decoded image, clamped as the pipeline's postprocess

    def __init__(self, pipe, batch_invariant: bool | str = True, name: str = "stage3"):
        super().__init__(pipe, batch_invariant, name)
        self.max_noise_level = pipe.config.max_noise_level
        vae = pipe.vae
        if vae.dtype == torch.float16 and vae.config.force_upcast:
            vae.to(torch.float32)  # as the pipeline's upcast_vae(), once instead of per call

    @torch.inference_mode()
    def admit(self, requests: list[StageRequest]) -> list[Task]:
        for request in requests:
            self._validate_common(request)
            if request.noise_level is None or request.noise_level > self.max_noise_level:
                raise InvalidParameter(
                    self._param("noise_level"),
                    f"must be in [0, {self.max_noise_level}] for this upscaler, got {request.noise_level!r}",
                )
            if not isinstance(request.prompt, str) or not request.prompt:
                raise InvalidParameter("prompt", f"{self.name} needs the prompt text")
            self._check_image(request)
        if not requests:
            return []
        cond, uncond = self._encode_prompts(requests)
        tasks = []
        for i, request in enumerate(requests):
            generator = self._generator(request)
            scheduler = self._scheduler(request)
            image = self.pipe.image_processor.preprocess(request.image).to(dtype=cond.dtype, device=self.device)
            noise_level = torch.tensor([request.noise_level], dtype=torch.long, device=self.device)
            noise = self._noise(image.shape, generator, cond.dtype)
            image = self.pipe.low_res_scheduler.add_noise(image, noise, noise_level)
            latent_shape = (1, self.pipe.vae.config.latent_channels, *image.shape[2:])
            latents = self._noise(latent_shape, generator, cond.dtype) * scheduler.init_noise_sigma
            guided = request.guidance_scale > 1.0
            tasks.append(
                Task(
                    request,
                    generator,
                    scheduler,
                    scheduler.timesteps,
                    latents,
                    cond[i : i + 1],
                    uncond[i : i + 1] if guided else None,
                    image_cond=image,
                    class_label=noise_level,
                )
            )
        return tasks

    def _encode_prompts(self, requests: list[StageRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched CLIP forward for all admitted prompts (one each under "per_task"); "" is what
        diffusers uses for no negative."""
        if self.invariance == "per_task" and len(requests) > 1:
            pairs = [self._encode_prompts([r]) for r in requests]
            return torch.cat([c for c, _ in pairs]), torch.cat([u for _, u in pairs])
        with self.row_groups([1] * len(requests)):
            return self.pipe.encode_prompt(
                [r.prompt for r in requests], self.device, 1, True, [r.negative_prompt or "" for r in requests]
            )

    def _model_input(self, task: Task) -> torch.Tensor:
        latents = task.scheduler.scale_model_input(task.sample, task.timestep)
        return torch.cat([latents, task.image_cond], dim=1)
