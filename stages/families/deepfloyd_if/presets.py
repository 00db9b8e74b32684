"""Model sizes for the checkpoints we generate.

`full` is the real architecture (IF-I-XL, IF-II-L, the x4 upscaler, T5-v1.1-XXL), read from the
configs shipped in `configs/full/` beside this module. `small` and `tiny` keep every block type, scheduler and
resolution of `full` (64 -> 256 -> 1024 px) and shrink only widths and depths: `tiny` for tests
(seconds on a CPU), `small` for CPU benchmarks (a UNet step costs tens of milliseconds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stages.presets import scaled_configs

PRESETS = ("tiny", "small", "full")

# Component name -> config file in configs/full.
_FULL_FILES = {
    "t5": "t5-v1_1-xxl.json",
    "stage1_unet": "if-i-xl.unet.json",
    "stage1_scheduler": "if-i.scheduler.json",
    "stage2_unet": "if-ii-l.unet.json",
    "stage2_scheduler": "if-ii.scheduler.json",
    "stage2_image_noising_scheduler": "if-ii.image_noising_scheduler.json",
    "stage3_unet": "sd-x4-upscaler.unet.json",
    "stage3_vae": "sd-x4-upscaler.vae.json",
    "stage3_text_encoder": "sd-x4-upscaler.text_encoder.json",
    "stage3_scheduler": "sd-x4-upscaler.scheduler.json",
    "stage3_low_res_scheduler": "sd-x4-upscaler.low_res_scheduler.json",
}

# Overrides on top of the full configs. Widths are multiples of norm_num_groups, cross-attention
# widths of 32 (the attention's cross GroupNorm has 32 groups); the T5 width feeds
# the IF UNets' encoder_hid_dim and the CLIP width the upscaler's cross_attention_dim.
_SCALED: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "t5": dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2),
        "stage1_unet": dict(
            block_out_channels=[16, 32, 48, 64],
            layers_per_block=1,
            attention_head_dim=16,
            addition_embed_type_num_heads=4,
            cross_attention_dim=64,
            norm_num_groups=8,
        ),
        "stage2_unet": dict(
            block_out_channels=[8, 16, 24, 32, 48],
            layers_per_block=[1, 1, 1, 1, 1],
            attention_head_dim=8,
            addition_embed_type_num_heads=4,
            cross_attention_dim=64,
            time_embedding_dim=48,
            norm_num_groups=4,
        ),
        "stage3_unet": dict(
            block_out_channels=[16, 16, 32, 32],
            layers_per_block=1,
            attention_head_dim=2,
            norm_num_groups=8,
        ),
        "stage3_vae": dict(
            block_out_channels=[8, 8, 16],
            layers_per_block=1,
            norm_num_groups=4,
            mid_block_add_attention=False,
        ),
        "stage3_text_encoder": dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            projection_dim=32,
        ),
    },
    "small": {
        "t5": dict(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=4, num_decoder_layers=4),
        "stage1_unet": dict(
            block_out_channels=[32, 64, 96, 128],
            layers_per_block=1,
            attention_head_dim=32,
            addition_embed_type_num_heads=4,
            cross_attention_dim=128,
        ),
        "stage2_unet": dict(
            block_out_channels=[16, 32, 48, 64, 96],
            layers_per_block=[1, 1, 1, 1, 1],
            attention_head_dim=16,
            addition_embed_type_num_heads=4,
            cross_attention_dim=96,
            time_embedding_dim=96,
            norm_num_groups=16,
        ),
        "stage3_unet": dict(
            block_out_channels=[16, 32, 32, 64],
            layers_per_block=1,
            attention_head_dim=4,
            norm_num_groups=16,
        ),
        "stage3_vae": dict(
            block_out_channels=[16, 16, 32],
            layers_per_block=1,
            norm_num_groups=8,
            mid_block_add_attention=False,
        ),
        "stage3_text_encoder": dict(
            hidden_size=64,
            intermediate_size=256,
            num_attention_heads=4,
            num_hidden_layers=4,
            projection_dim=64,
        ),
    },
    "full": {},
}


@dataclass(frozen=True)
class Preset:
    name: str
    configs: dict[str, dict[str, Any]]
    # Sizes of the generated tokenizers; `full` keeps the real embedding tables (their vocab_size).
    t5_pieces: int
    clip_merges: int

    def config(self, component: str) -> dict[str, Any]:
        return dict(self.configs[component])


def get_preset(name: str) -> Preset:
    configs = scaled_configs("stages.families.deepfloyd_if.configs.full", _FULL_FILES, _SCALED, name)
    t5_width = configs["t5"]["d_model"]
    configs["stage1_unet"]["encoder_hid_dim"] = t5_width
    configs["stage2_unet"]["encoder_hid_dim"] = t5_width
    configs["stage3_unet"]["cross_attention_dim"] = configs["stage3_text_encoder"]["hidden_size"]
    return Preset(name=name, configs=configs, t5_pieces=2000, clip_merges=3000)
