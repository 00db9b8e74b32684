"""Model sizes for the DeciDiffusion checkpoints we generate.

`full` is the published architecture (U-Net-NAS from its `flexible_unet` configuration, SD-1.x's CLIP
ViT-L/14 text encoder and VAE, the published DDIM scheduler), read from `configs/full/` beside this
module. `small` and `tiny` keep every block layout (the same resnet and attention counts per block),
the scheduler and the 512 px output, and shrink only widths and depths: `tiny` for tests, `small` for
CPU benchmarks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from stages.presets import scaled_configs

PRESETS = ("tiny", "small", "full")

_FULL_FILES = {
    "unet": "flexible_unet.configurations.json",
    "scheduler": "scheduler.json",
    "text_encoder": "text_encoder.json",
    "vae": "vae.json",
}


def _unet(width: int, heads: int, groups: int) -> dict[str, Any]:
    """The published block layout at a tenth (or a fifth) of its widths: 320, 640, 1280 -> w, 2w, 4w."""
    return dict(
        down_blocks_in_channels=[width, width, 2 * width],
        down_blocks_out_channels=[width, 2 * width, 4 * width],
        prev_output_channels=[4 * width, 4 * width, 2 * width],
        temb_dim=4 * width,
        num_attention_heads=heads,
        norm_num_groups=groups,
    )


_SCALED: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "unet": _unet(32, heads=2, groups=8),
        "text_encoder": dict(
            hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, projection_dim=32
        ),  # fmt: skip
        "vae": dict(
            block_out_channels=[8, 8, 16, 16], layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False
        ),  # fmt: skip
    },
    "small": {
        "unet": _unet(64, heads=4, groups=16),
        "text_encoder": dict(
            hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=4, projection_dim=64
        ),  # fmt: skip
        "vae": dict(
            block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, mid_block_add_attention=False
        ),  # fmt: skip
    },
    "full": {},
}


@dataclass(frozen=True)
class Preset:
    name: str
    configs: dict[str, dict[str, Any]]
    clip_merges: int = 3000  # size of the generated tokenizer; `full` keeps the released vocabulary size

    def config(self, component: str) -> dict[str, Any]:
        return copy.deepcopy(self.configs[component])


def get_preset(name: str) -> Preset:
    configs = scaled_configs("stages.families.decidiffusion.configs.full", _FULL_FILES, _SCALED, name)
    configs["unet"]["cross_attention_dim"] = configs["text_encoder"]["hidden_size"]
    return Preset(name=name, configs=configs)
