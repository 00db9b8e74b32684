"""IF's pixel stages: stage I (text -> 64 px) and stage II (64 -> 256 px).

Each reproduces the body of diffusers' `IFPipeline` / `IFSuperResolutionPipeline` denoising loop for one
task, with the pipeline's own components: same noise draws in the same order from the task's
generator, same guidance on the epsilon channels with the text row's learned variance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stages.engine import DenoisingStage
from stages.errors import InvalidParameter
from stages.task import StageRequest, Task, TextEmbeddings


class IFPixelStage(DenoisingStage):
    @property
    def embed_dim(self) -> int:
        config = self.unet.config
        return config.encoder_hid_dim or config.cross_attention_dim

    def _embeddings(self, request: StageRequest) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        cond = emb.prompt_embeds.to(self.device, self.dtype)
        guided = request.guidance_scale > 1.0  # diffusers: do_classifier_free_guidance
        return cond, emb.negative_embeds.to(self.device, self.dtype) if guided else None

    def _guide(self, task: Task, uncond: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        channels = task.sample.shape[1]
        noise_pred = text
        if uncond is not None:
            noise_pred_uncond, _ = uncond.split(channels, dim=1)
            noise_pred_text, predicted_variance = text.split(channels, dim=1)
            guidance = task.request.guidance_scale
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
            noise_pred = torch.cat([noise_pred, predicted_variance], dim=1)
        if task.scheduler.config.variance_type not in ["learned", "learned_range"]:
            noise_pred, _ = noise_pred.split(channels, dim=1)
        return noise_pred


class StageI(IFPixelStage):
    """Text embeddings -> 64x64 image (IFPipeline)."""

    def admit(self, requests: list[StageRequest]) -> list[Task]:
        tasks = []
        size = self.unet.config.sample_size
        for request in requests:
            self._validate_common(request)
            cond, uncond = self._embeddings(request)
            generator = self._generator(request)
            scheduler = self._scheduler(request)
            shape = (1, self.unet.config.in_channels, size, size)
            sample = self._noise(shape, generator, cond.dtype) * scheduler.init_noise_sigma
            tasks.append(Task(request, generator, scheduler, scheduler.timesteps, sample, cond, uncond))
        return tasks

    def _model_input(self, task: Task) -> torch.Tensor:
        return task.scheduler.scale_model_input(task.sample, task.timestep)


class StageII(IFPixelStage):
    """64x64 image + text embeddings -> 256x256 image (IFSuperResolutionPipeline)."""

    def admit(self, requests: list[StageRequest]) -> list[Task]:
        tasks = []
        size = self.unet.config.sample_size
        for request in requests:
            self._validate_common(request)
            if request.noise_level is None:
                raise InvalidParameter(self._param("noise_level"), "is required")
            cond, uncond = self._embeddings(request)
            image = self._check_image(request)
            generator = self._generator(request)
            scheduler = self._scheduler(request)
            channels = self.unet.config.in_channels // 2
            sample = self._noise((1, channels, size, size), generator, cond.dtype) * scheduler.init_noise_sigma

            image = self.pipe.preprocess_image(image, 1, self.device)
            upscaled = F.interpolate(image, (size, size), mode="bilinear", align_corners=True)
            noise_level = torch.tensor([request.noise_level], device=upscaled.device)
            noise = self._noise(upscaled.shape, generator, upscaled.dtype)
            upscaled = self.pipe.image_noising_scheduler.add_noise(upscaled, noise, timesteps=noise_level)
            tasks.append(
                Task(
                    request,
                    generator,
                    scheduler,
                    scheduler.timesteps,
                    sample,
                    cond,
                    uncond,
                    image_cond=upscaled,
                    class_label=noise_level,
                )
            )
        return tasks

    def _model_input(self, task: Task) -> torch.Tensor:
        model_input = torch.cat([task.sample, task.image_cond], dim=1)
        return task.scheduler.scale_model_input(model_input, task.timestep)
