"""IF's models for `ifserve estimate` (stages/estimates.py): built on the meta device from a preset's
configs, with the calls each deployment makes, so FLOPs, activations and kernel launches can be counted
without weights or a GPU."""

from __future__ import annotations

ENCODER = "text_encoder"  # the text encoder's node, as stages/estimates.py names it


def estimate_calls(preset_name: str, dtype: str, encoder_dtype: str):
    """IF's models built on the meta device, and per node: (models with their dtypes, the step's call at
    n tasks, {"admit"/"finish": (a task's call then, its dtype)}, output size). Classifier-free guidance
    doubles every row."""
    import torch

    from stages.families.deepfloyd_if.checkpoints import (
        build_clip_text_encoder,
        build_text_encoder,
        build_unet,
        build_vae,
    )
    from stages.families.deepfloyd_if.presets import get_preset

    preset = get_preset(preset_name)
    tokens = 77  # IF's and CLIP's prompt length
    with torch.device("meta"):
        t5 = build_text_encoder(preset).eval()
        unets = {name: build_unet(preset, name).eval() for name in ("stage1", "stage2", "stage3")}
        vae = build_vae(preset).eval()
        clip = build_clip_text_encoder(preset).eval()
    vae_dtype = "float32" if dtype == "float16" and vae.config.get("force_upcast", True) else dtype
    cast = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    # torch's own cast: diffusers' `to` warns of casting without its keep-in-float32 list (which loading
    # applies, and `loaded_bytes` counts)
    torch.nn.Module.to(t5, cast[encoder_dtype])
    torch.nn.Module.to(clip, cast[dtype])
    torch.nn.Module.to(vae, cast[vae_dtype])
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    def unet_call(name: str, side: int):
        unet = torch.nn.Module.to(unets[name], cast[dtype])
        config = unet.config
        width = config.encoder_hid_dim or config.cross_attention_dim
        labels = config.class_embed_type is not None or config.num_class_embeds is not None

        def call(n: int):
            rows = 2 * n

            def forward():  # tensors made here, in the meta device's scope
                extra = {"class_labels": torch.zeros(rows, dtype=torch.long)} if labels else {}
                return unet(
                    torch.zeros(rows, config.in_channels, side, side, dtype=cast[dtype]),
                    torch.zeros(rows, dtype=torch.long),
                    encoder_hidden_states=torch.zeros(rows, tokens, width, dtype=cast[dtype]),
                    **extra,
                )

            return forward

        return call

    def encode(model):
        # prompts, then their negatives: two forwards of n rows (diffusers' encode_prompt)
        return lambda n: lambda: [model(torch.zeros(n, tokens, dtype=torch.long)) for _ in range(2)]

    def decode():
        return vae.decode(torch.zeros(1, vae.config.latent_channels, 256, 256, dtype=cast[vae_dtype]))

    return {
        ENCODER: ([(t5, encoder_dtype)], encode(t5), {}, 0),
        "stage1": ([(unets["stage1"], dtype)], unet_call("stage1", 64), {}, 64),
        "stage2": ([(unets["stage2"], dtype)], unet_call("stage2", 256), {}, 256),
        "stage3": (
            [(unets["stage3"], dtype), (vae, vae_dtype), (clip, dtype)],
            unet_call("stage3", 1024 // vae_scale),
            {
                "admit": (encode(clip)(1), dtype),  # the upscaler encodes a task's prompt with CLIP
                "finish": (decode, vae_dtype),  # ... and decodes its latents through the VAE
            },
            1024,
        ),
    }
