"""IF's pixel stages: stage I (text -> 64 px) and stage II (64 -> 256 px).

Each reproduces the body of diffusers' `IFPipeline` / `IFSuperResolutionPipeline` denoising loop for one
task, with the pipeline's own components: same noise draws in the same order from the task's
generator, same guidance on the epsilon channels with the text row's learned variance.

A task may also be an edit: image-to-image (`IFImg2ImgPipeline`, `IFImg2ImgSuperResolutionPipeline`)
starts from the given picture noised to the timestep its strength picks; inpainting (`IFInpainting*`)
also keeps the picture outside its mask at every step. Only how a task starts and how its step blends
differ (stages/engine.py), so edits share batched steps with text-to-image tasks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import IFImg2ImgPipeline, IFImg2ImgSuperResolutionPipeline, IFInpaintingPipeline

from stages.engine import DenoisingStage
from stages.errors import InvalidParameter
from stages.task import StageRequest, Task


class IFPixelStage(DenoisingStage):
    def __init__(self, pipe, batch_invariant: bool | str = True, name: str = "stage"):
        super().__init__(pipe, batch_invariant, name)
        self.watermark_size = self.unet.config.sample_size  # as IF's pipelines call the watermarker

    def _guide(self, tasks: list[Task], uncond: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        channels = tasks[0].sample.shape[1]
        noise_pred = text
        if uncond is not None:
            noise_pred_uncond, _ = uncond.split(channels, dim=1)
            noise_pred_text, predicted_variance = text.split(channels, dim=1)
            noise_pred = super()._guide(tasks, noise_pred_uncond, noise_pred_text)
            noise_pred = torch.cat([noise_pred, predicted_variance], dim=1)
        if tasks[0].scheduler.config.variance_type not in ["learned", "learned_range"]:
            noise_pred, _ = noise_pred.split(channels, dim=1)
        return noise_pred

    def _edit(self, request: StageRequest, preprocess, dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """An edit's picture and mask as tensors at this stage's size, by diffusers' own preprocessing
        (bicubic resize, [-1, 1]; the mask thresholded at 0.5). Those methods read nothing of their
        pipeline but its UNet's sample size, so they run on this stage's pipeline as it is."""
        self._check_edit(request)
        if request.init_image is None:
            return None, None
        image = preprocess(self.pipe, request.init_image).to(self.device, dtype)
        mask = None
        if request.mask is not None:
            mask = IFInpaintingPipeline.preprocess_mask_image(self.pipe, request.mask).to(self.device, dtype)
        return image, mask


class StageI(IFPixelStage):
    """Text embeddings -> 64x64 image (IFPipeline)."""

    def admit(self, requests: list[StageRequest]) -> list[Task]:
        tasks = []
        size = self.unet.config.sample_size
        for request in requests:
            self._validate_common(request)
            cond, uncond = self._embeddings(request)
            start, mask = self._edit(request, IFImg2ImgPipeline.preprocess_image, cond.dtype)
            generator = self._generator(request)
            scheduler = self._scheduler(request)
            timesteps = self._timesteps(scheduler, request)
            shape = (1, self.unet.config.in_channels, size, size)
            sample = self._start(scheduler, timesteps, generator, shape, cond.dtype, start, mask)
            tasks.append(Task(request, generator, scheduler, timesteps, sample, cond, uncond, mask=mask))
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
            start, mask = self._edit(request, IFImg2ImgSuperResolutionPipeline.preprocess_original_image, cond.dtype)
            generator = self._generator(request)
            scheduler = self._scheduler(request)
            timesteps = self._timesteps(scheduler, request)
            channels = self.unet.config.in_channels // 2
            sample = self._start(scheduler, timesteps, generator, (1, channels, size, size), cond.dtype, start, mask)

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
                    timesteps,
                    sample,
                    cond,
                    uncond,
                    image_cond=upscaled,
                    class_label=noise_level,
                    mask=mask,
                )
            )
        return tasks

    def _model_input(self, task: Task) -> torch.Tensor:
        model_input = torch.cat([task.sample, task.image_cond], dim=1)
        return task.scheduler.scale_model_input(model_input, task.timestep)
