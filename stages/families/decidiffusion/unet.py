"""DeciDiffusion's denoiser, U-Net-NAS, built from its published `flexible_unet` configuration.

It keeps Stable Diffusion's stem and head (`conv_in`, the time embedding, `conv_norm_out`, `conv_out`)
and replaces the down, mid and up blocks with blocks whose resnets (R) and transformer blocks (A)
interleave unevenly, as the configuration's counts say. Each block holds them in one `modules_list`
in the order they run (`down_blocks.1.modules_list.{0,1,2}` = R, A, R), the names the published
weights use, so those weights load into it.

The model is a `UNet2DConditionModel`: diffusers' own forward walks these blocks (they answer its
interface: `has_cross_attention`, `resnets`, the skip tuples), so diffusers' schedulers and pipelines
drive it as they drive SD's UNet, and `StableDiffusionPipeline` takes it as its `unet`. A pipeline
folder's model_index.json names it as ["stages.families.decidiffusion.unet", "FlexibleUNet2DConditionModel"];
diffusers loads such a component once this module is imported (it never imports a module a folder names).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

RESNET, ATTENTION = "R", "A"
# diffusers picks a component's loading method by looking its base classes up in the module that
# model_index.json names: ModelMixin must be found here.
__all__ = ["FlexibleUNet2DConditionModel", "ModelMixin"]


def block_layout(resnets: int, attentions: int, mixed: bool = True) -> list[str]:
    """The order of a down or up block's modules: R, A, R, A, ... then the rest of the longer kind
    (`mixed`, the published setting), or every R before every A."""
    order = []
    for i in range(max(resnets, attentions)):
        order += [RESNET] * (i < resnets) + [ATTENTION] * (i < attentions)
    return order if mixed else sorted(order, key=[RESNET, ATTENTION].index)


def mid_layout(resnets: int, attentions: int, mixed: bool = True) -> list[str]:
    """The mid block's order: one R always, then A, R, A, R, ... and the rest of the longer kind."""
    order = [RESNET]
    for i in range(max(resnets, attentions)):
        order += [ATTENTION] * (i < attentions) + [RESNET] * (i < resnets)
    return order if mixed else sorted(order, key=[RESNET, ATTENTION].index)


class _Parts:
    """The settings every block shares, and the two kinds of module it is made of."""

    def __init__(self, temb_channels: int, eps: float, act_fn: str, groups: int, heads: int, cross_dim: int):
        self.temb_channels, self.eps, self.act_fn, self.groups = temb_channels, eps, act_fn, groups
        self.heads, self.cross_dim = heads, cross_dim

    def resnet(self, in_channels: int, out_channels: int) -> ResnetBlock2D:
        return ResnetBlock2D(
            in_channels=in_channels,
            out_channels=out_channels,
            temb_channels=self.temb_channels,
            eps=self.eps,
            groups=self.groups,
            non_linearity=self.act_fn,
        )

    def attention(self, channels: int) -> Transformer2DModel:
        return Transformer2DModel(
            num_attention_heads=self.heads,
            attention_head_dim=channels // self.heads,
            in_channels=channels,
            cross_attention_dim=self.cross_dim,
            norm_num_groups=self.groups,
        )


# What diffusers' UNet forward hands a cross-attention block for its transformer blocks.
_ATTENTION_ARGS = ("encoder_hidden_states", "attention_mask", "cross_attention_kwargs", "encoder_attention_mask")


def _attend(module: Transformer2DModel, hidden: torch.Tensor, kw: dict[str, Any]) -> torch.Tensor:
    return module(hidden, return_dict=False, **{name: kw.get(name) for name in _ATTENTION_ARGS})[0]


class FlexibleCrossAttnDownBlock2D(nn.Module):
    """Down block: its resnets' outputs are the skips (taken before any A that follows), then the
    downsampled output, unless it is the last block."""

    has_cross_attention = True

    def __init__(self, parts: _Parts, in_channels: int, out_channels: int, layout: list[str], *, add_downsample: bool,
                 last_block: bool):  # fmt: skip
        super().__init__()
        modules, channels = [], in_channels
        for kind in layout:
            if kind == RESNET:
                modules.append(parts.resnet(channels, out_channels))
                channels = out_channels
            else:
                modules.append(parts.attention(out_channels))
        self.modules_list = nn.ModuleList(modules)
        self.downsamplers = None
        if add_downsample:
            conv = Downsample2D(out_channels, use_conv=True, out_channels=out_channels, padding=1, name="op")
            self.downsamplers = nn.ModuleList([conv])
        self.last_block = last_block

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, **attend: Any):
        skips = ()
        for module in self.modules_list:
            if isinstance(module, ResnetBlock2D):
                hidden_states = module(hidden_states, temb)
                skips += (hidden_states,)
            else:
                hidden_states = _attend(module, hidden_states, attend)
        if self.downsamplers is not None:
            for downsampler in self.downsamplers:
                hidden_states = downsampler(hidden_states)
            if not self.last_block:
                skips += (hidden_states,)
        return hidden_states, skips


class FlexibleUNetMidBlock2DCrossAttn(nn.Module):
    has_cross_attention = True

    def __init__(self, parts: _Parts, channels: int, layout: list[str], *, add_upsample: bool):
        super().__init__()
        self.modules_list = nn.ModuleList(
            parts.resnet(channels, channels) if kind == RESNET else parts.attention(channels) for kind in layout
        )
        upsampler = Upsample2D(channels, use_conv=True, out_channels=channels) if add_upsample else nn.Identity()
        self.upsamplers = nn.ModuleList([upsampler])

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor | None = None, **attend: Any):
        # The published forward runs the first resnet, then every module in order, the first resnet
        # included: it runs twice. The released weights were trained so; kept for their images.
        hidden_states = self.modules_list[0](hidden_states, temb)
        for module in self.modules_list:
            if isinstance(module, ResnetBlock2D):
                hidden_states = module(hidden_states, temb)
            else:
                hidden_states = _attend(module, hidden_states, attend)
        for upsampler in self.upsamplers:
            hidden_states = upsampler(hidden_states)
        return hidden_states


class FlexibleCrossAttnUpBlock2D(nn.Module):
    """Up block: each resnet takes the last skip left (concatenated to its input), as in SD's up blocks."""

    has_cross_attention = True

    def __init__(self, parts: _Parts, in_channels: int, out_channels: int, prev_output_channel: int,
                 layout: list[str], *, add_upsample: bool):  # fmt: skip
        super().__init__()
        count = layout.count(RESNET)
        modules, seen = [], 0
        for kind in layout:
            if kind == RESNET:
                skip = in_channels if seen == count - 1 else out_channels
                modules.append(parts.resnet((prev_output_channel if seen == 0 else out_channels) + skip, out_channels))
                seen += 1
            else:
                modules.append(parts.attention(out_channels))
        self.modules_list = nn.ModuleList(modules)
        # diffusers' forward hands this block len(resnets) skips (a plain list: registered once, above)
        self.resnets = [m for m in modules if isinstance(m, ResnetBlock2D)]
        self.upsamplers = None
        if add_upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def forward(
        self, hidden_states: torch.Tensor, res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None, upsample_size=None, **attend: Any
    ):  # fmt: skip
        skips = list(res_hidden_states_tuple)
        for module in self.modules_list:
            if isinstance(module, ResnetBlock2D):
                hidden_states = module(torch.cat([hidden_states, skips.pop()], dim=1), temb)
            else:
                hidden_states = _attend(module, hidden_states, attend)
        if self.upsamplers is not None:
            for upsampler in self.upsamplers:
                hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states


# What diffusers' UNet constructor registers in the config: the stem's settings, read by its forward and
# by pipelines (in_channels, sample_size, time_cond_proj_dim, ...). They follow from `configurations`.
_UNET_KEYS = frozenset(inspect.signature(UNet2DConditionModel.__init__).parameters) - {"self"}


class FlexibleUNet2DConditionModel(UNet2DConditionModel):
    """U-Net-NAS from `configurations` (the published `flexible_unet` keys; `norm_num_groups`, 32 unless
    given, lets the small presets narrow the widths)."""

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # A saved config.json holds the derived UNet keys too; only `configurations` builds the model.
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k not in _UNET_KEYS}, **kwargs)

    @register_to_config
    def __init__(self, configurations: dict[str, Any]):
        c = dict(configurations)
        groups = c.get("norm_num_groups", 32)
        stem = c["down_blocks_in_channels"][0]
        # SD's stem, time embedding and head from diffusers' own constructor, with one plain block as
        # a stand-in that the flexible blocks replace below.
        super().__init__(
            sample_size=c.get("sample_size", 64),
            in_channels=c.get("in_channels", 4),
            out_channels=c.get("out_channels", 4),
            down_block_types=("DownBlock2D",),
            up_block_types=("UpBlock2D",),
            mid_block_type=None,
            block_out_channels=(stem,),
            layers_per_block=1,
            norm_num_groups=groups,
            cross_attention_dim=c["cross_attention_dim"],
            time_embedding_dim=c["temb_dim"],
        )
        mixed = c.get("mix_block_in_forward", True)
        parts = _Parts(
            c["temb_dim"],
            c["resnet_eps"],
            c["resnet_act_fn"],
            groups,
            c["num_attention_heads"],
            c["cross_attention_dim"],
        )
        down = list(
            zip(
                c["down_blocks_in_channels"],
                c["down_blocks_out_channels"],
                c["down_blocks_num_resnets"],
                c["down_blocks_num_attentions"],
                c["add_downsample"],
                strict=True,
            )
        )
        self.down_blocks = nn.ModuleList(
            FlexibleCrossAttnDownBlock2D(
                parts, cin, cout, block_layout(n_res, n_att, mixed), add_downsample=down_, last_block=i == len(down) - 1
            )
            for i, (cin, cout, n_res, n_att, down_) in enumerate(down)
        )
        width = c["down_blocks_out_channels"][-1]
        self.mid_block = FlexibleUNetMidBlock2DCrossAttn(
            parts,
            width,
            mid_layout(c["mid_num_resnets"], c["mid_num_attentions"], mixed),
            add_upsample=c["add_upsample_mid_block"],
        )
        up = zip(
            reversed(c["down_blocks_in_channels"]),
            reversed(c["down_blocks_out_channels"]),
            c["prev_output_channels"],
            c["up_blocks_num_resnets"],
            c["up_blocks_num_attentions"],
            c["add_upsample"],
            strict=True,
        )
        self.up_blocks = nn.ModuleList(
            FlexibleCrossAttnUpBlock2D(parts, cin, cout, prev, block_layout(n_res, n_att, mixed), add_upsample=up_)
            for cin, cout, prev, n_res, n_att, up_ in up
        )
        # diffusers' forward passes explicit upsample sizes when a latent side is not a multiple of this
        self.num_upsamplers = sum(c["add_upsample"]) + bool(c["add_upsample_mid_block"])
        # The config says what was built, not the stand-in block.
        self.register_to_config(
            down_block_types=[type(b).__name__ for b in self.down_blocks],
            mid_block_type=type(self.mid_block).__name__,
            up_block_types=[type(b).__name__ for b in self.up_blocks],
            block_out_channels=list(c["down_blocks_out_channels"]),
            layers_per_block=None,
        )
