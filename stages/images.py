"""Tensor <-> picture conversions, done the way the reference code does them."""

from __future__ import annotations

import io

import PIL.Image
import torch
from diffusers.utils import pt_to_pil


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    """A (1, 3, H, W) image in [-1, 1] as an 8-bit picture (diffusers' `pt_to_pil`), or one already in
    8 bits (`to_uint8`)."""
    if image.dtype == torch.uint8:
        return PIL.Image.fromarray(image[0].permute(1, 2, 0).numpy())
    return pt_to_pil(image)[0]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """A (1, 3, H, W) image in [-1, 1] in 8 bits per channel, on the host, exactly as `pt_to_pil` rounds it
    (a final image crosses from its replica a quarter of its float32 size)."""
    scaled = (image / 2 + 0.5).clamp(0, 1).cpu().float() * 255
    return scaled.round().to(torch.uint8)


def png_bytes(picture: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def contact_sheet(pictures: list[PIL.Image.Image], height: int = 256) -> PIL.Image.Image:
    """Pictures side by side, each scaled to `height` pixels high."""
    scaled = [p.resize((round(p.width * height / p.height), height)) for p in pictures]
    sheet = PIL.Image.new("RGB", (sum(p.width for p in scaled), height), "white")
    x = 0
    for picture in scaled:
        sheet.paste(picture, (x, 0))
        x += picture.width
    return sheet
