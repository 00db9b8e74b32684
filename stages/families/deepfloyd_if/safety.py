"""IF's safety checker and watermark on final images, as diffusers' IF pipelines apply them.

The seed's reference code hands stage I's `feature_extractor`, `safety_checker` and `watermarker` to the
x4 upscaler, so the final image of every size passes through the same three: the picture goes to the
checker as 8-bit RGB through the feature extractor; a picture it flags (NSFW, or a watermark of its
own) becomes black; then IF's watermark is pasted in the corner. This is the `output_type="pil"` path
of `IFPipeline` and `StableDiffusionUpscalePipeline`, call for call, with one difference: for a flagged
image the upscale pipeline raises a TypeError (IF's checker assigns a numpy array into the decoded
torch tensor there), where this blacks the image out as IF's own pipelines do.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.deepfloyd_if import IFSafetyChecker, IFWatermarker
from transformers import CLIPImageProcessor

from stages.errors import CheckpointError
from stages.task import Presented

COMPONENTS = ("feature_extractor", "safety_checker", "watermarker")


class _SafetyChecker(IFSafetyChecker):
    """diffusers' IFSafetyChecker never calls `post_init`, without which transformers 5 cannot load it
    (`from_pretrained` fails on `all_tied_weights_keys`, the released IF-I checkpoint included)."""

    def __init__(self, config):
        super().__init__(config)
        self.post_init()


class SafetyFilter:
    def __init__(self, feature_extractor, checker: IFSafetyChecker, watermarker: IFWatermarker):
        self.feature_extractor = feature_extractor
        self.checker = checker
        self.watermarker = watermarker
        self.numpy_to_pil = DiffusionPipeline.numpy_to_pil

    @classmethod
    def load(cls, stage1_folder: Path, *, torch_dtype: torch.dtype | None = None, device="cpu") -> SafetyFilter:
        """The three components from their folders in IF-I's pipeline folder."""
        missing = [name for name in COMPONENTS if not (Path(stage1_folder) / name).is_dir()]
        if missing:
            raise CheckpointError(
                f"model.safety_checker: {stage1_folder} has no {', '.join(missing)} folder "
                "(`ifserve checkpoints --safety-checker` writes tiny ones)"
            )
        try:
            checker = _SafetyChecker.from_pretrained(Path(stage1_folder) / "safety_checker", dtype=torch_dtype)
            extractor = CLIPImageProcessor.from_pretrained(Path(stage1_folder) / "feature_extractor")
            watermarker = IFWatermarker.from_pretrained(Path(stage1_folder) / "watermarker", torch_dtype=torch_dtype)
        except Exception as err:  # noqa: BLE001 - the libraries raise many types for broken folders
            raise CheckpointError(f"model.safety_checker: cannot load it from {stage1_folder}: {err}") from err
        return cls(extractor, checker.to(device), watermarker)

    @torch.inference_mode()
    def present(self, image: torch.Tensor, sample_size: int | None = None) -> Presented:
        """`image` (1, 3, H, W) in [-1, 1] as the pipelines return it; `sample_size` is what IF's
        pipelines pass to the watermarker (their UNet's), None for the upscaler's."""
        array = (image / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
        clip_input = self.feature_extractor(self.numpy_to_pil(array), return_tensors="pt")
        dtype = self.checker.dtype
        array, nsfw, watermark = self.checker(
            images=array, clip_input=clip_input.pixel_values.to(self.checker.device, dtype)
        )
        pictures = self.numpy_to_pil(array)
        self.watermarker.apply_watermark(pictures, sample_size)
        return Presented(pictures[0], bool(nsfw[0]), bool(watermark[0]))
