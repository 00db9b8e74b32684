"""Pictures a client uploads to edit (the image, and the mask for inpainting), read safely.

The type is sniffed from the content (PNG, JPEG or WebP), never taken from a filename or content type.
The pixel count is checked from the header before anything is decoded, so a small file that claims
50000 x 50000 pixels (a decompression bomb) costs nothing; then the whole picture is decoded, so a
truncated file is refused here rather than deep inside a stage. Every refusal names its field.

Masks come in two conventions and both are accepted: OpenAI's (a PNG whose fully transparent pixels are
repainted) and diffusers' (grey: white is repainted, black kept). Both become diffusers' grey mask.
"""

from __future__ import annotations

import io
import warnings
from typing import BinaryIO

import PIL.Image

from stages.errors import InvalidParameter
from stages.task import EditImages

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_PIXELS = 4096 * 4096


def read_picture(data: bytes | BinaryIO, field: str, *, max_pixels: int = MAX_PIXELS) -> PIL.Image.Image:
    """The decoded picture in `data` (bytes, or a file such as an upload spooled to disk); InvalidParameter
    (field) if it is not a whole PNG, JPEG or WebP picture of at most `max_pixels` pixels."""
    source = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    source.seek(0, io.SEEK_END)
    if not source.tell():
        raise InvalidParameter(field, "is empty")
    source.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            picture = PIL.Image.open(source, formats=FORMATS)  # reads the header only
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning):
        raise InvalidParameter(field, f"has more than {max_pixels} pixels") from None
    except (PIL.UnidentifiedImageError, OSError, ValueError):
        raise InvalidParameter(field, f"is not a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} picture") from None
    width, height = picture.size
    if width * height > max_pixels:
        raise InvalidParameter(field, f"is {width}x{height}, more than {max_pixels} pixels")
    try:
        picture.load()
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        raise InvalidParameter(field, f"cannot be decoded ({err})") from None
    return picture


def to_mask(picture: PIL.Image.Image) -> PIL.Image.Image:
    """A mask in diffusers' convention (8-bit grey, white repainted). A picture with transparent pixels
    is read in OpenAI's (repaint where alpha is 0); any other is read as grey."""
    if picture.mode in ("RGBA", "LA", "PA") or "transparency" in picture.info:
        alpha = picture.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            return alpha.point(lambda a: 255 if a == 0 else 0)
    return picture.convert("L")


def read_edit(
    image: bytes | BinaryIO, mask: bytes | BinaryIO | None = None, *, max_pixels: int = MAX_PIXELS
) -> EditImages:
    """What an edit starts from: a square picture and, for inpainting, a mask of the same size."""
    picture = read_picture(image, "image", max_pixels=max_pixels)
    if picture.width != picture.height:
        raise InvalidParameter("image", f"must be square, got {picture.width}x{picture.height}")
    grey = None
    if mask is not None:
        mask_picture = read_picture(mask, "mask", max_pixels=max_pixels)
        if mask_picture.size != picture.size:
            raise InvalidParameter(
                "mask",
                f"is {mask_picture.width}x{mask_picture.height}, the image {picture.width}x{picture.height}: "
                "they must match",
            )
        grey = to_mask(mask_picture)
    return EditImages(picture.convert("RGB"), grey)
