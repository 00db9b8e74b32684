"""Image-to-image and inpainting through the cascade: each edit equals the seed's reference code
(diffusers' IFImg2Img*/IFInpainting* pipelines, then the x4 upscaler) on the same checkpoints, picture,
mask, strength and seed, alone and sharing batched steps with text-to-image tasks. Uploaded pictures
are refused early and by name when they are not whole, bounded, square pictures with a matching mask."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import IFImg2ImgPipeline

from stages.errors import InvalidParameter
from stages.families.deepfloyd_if import GenerationParams, Img2ImgParams, InpaintParams
from stages.images import to_pil
from stages.pictures import read_edit, read_picture, to_mask
from stages.task import EditImages
from tests.reference import reference_cascade

TOL = 1e-4
SIZES = (64, 256, 1024)


def picture(side: int = 96, seed: int = 0) -> PIL.Image.Image:
    """A smooth test picture (gradients plus a little noise), not a multiple of any stage's size."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + rng.normal(0, 20, (side, side, 3))
    return PIL.Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def grey_mask(side: int = 96) -> PIL.Image.Image:
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : side * 3 // 4, side // 3 : side] = 255
    return PIL.Image.fromarray(mask)


def alpha_mask(side: int = 96) -> PIL.Image.Image:
    """OpenAI's convention: opaque everywhere but a transparent square, which is repainted."""
    rgba = np.full((side, side, 4), 255, np.uint8)
    rgba[10:60, 20:80, 3] = 0
    return PIL.Image.fromarray(rgba)


def png(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


FAST = dict(stage1_steps=8, stage2_steps=5, stage3_steps=3)
CASES = [
    (Img2ImgParams(prompt="a watercolor of a harbour", seed=3, **FAST), picture(), None),
    (
        Img2ImgParams(
            prompt="a red bicycle",
            negative_prompt="blurry",
            seed=9,
            stage1_steps=10,
            stage1_strength=0.45,
            stage1_guidance=3.0,
            stage2_steps=6,
            stage2_strength=1.0,
            stage2_guidance=1.0,
            stage3_steps=3,
        ),
        picture(64, seed=1),
        None,
    ),
    (InpaintParams(prompt="blue sunglasses", seed=5, **FAST), picture(), grey_mask()),
    (
        InpaintParams(
            prompt="a cat",
            seed=12,
            stage1_timesteps="fast27",
            stage1_strength=0.6,
            stage2_steps=4,
            stage2_noise_level=50,
            stage3_steps=3,
            stage3_guidance=1.0,
        ),
        picture(128, seed=2),
        to_mask(alpha_mask(128)),
    ),
]


@pytest.fixture(scope="module")
def references(reference_pipes):
    return [reference_cascade(reference_pipes, params, image, mask)[0] for params, image, mask in CASES]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def _pixel_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    return int(np.abs(np.asarray(to_pil(a), np.int16) - np.asarray(to_pil(b), np.int16)).max())


@pytest.mark.parametrize("case", range(len(CASES)))
def test_edit_alone_equals_the_reference_pipelines(cascade, references, case):
    params, image, mask = CASES[case]
    result = cascade.generate(params, EditImages(image, mask))
    for size in SIZES:
        assert _max_diff(result.tensors[size], references[case][size]) <= TOL, size
        assert _pixel_diff(result.tensors[size], references[case][size]) <= 1, size


def test_edits_share_batched_steps_with_text_to_image(cascade, references, reference_pipes):
    """Two edits of each kind and a text-to-image request in the same batches: each is its reference."""
    text = GenerationParams(prompt="a lighthouse at dusk", seed=21, **FAST)
    text_reference = reference_cascade(reference_pipes, text)[0]
    requests = [text, *(params for params, _, _ in CASES)]
    edits = [None, *(EditImages(image, mask) for _, image, mask in CASES)]
    stage1 = cascade.stages["stage1"]
    calls_before = stage1.unet_calls
    results = cascade.generate_many(requests, edits=edits, max_batch_size=8)
    assert [r.error for r in results] == [None] * len(requests)
    for result, reference in zip(results, [text_reference, *references], strict=True):
        for size in SIZES:
            assert _max_diff(result.tensors[size], reference[size]) <= TOL, (result.params.seed, size)
            assert _pixel_diff(result.tensors[size], reference[size]) <= 1, (result.params.seed, size)
    # Stage I ran fewer UNet calls than task steps: the kinds shared calls. A task's steps are
    # int(steps * strength) for an edit (diffusers' get_timesteps), in CASES' order after the text request.
    task_steps = 8 + 8 * 0.7 // 1 + 10 * 0.45 // 1 + 8 + 27 * 0.6 // 1
    assert stage1.unet_calls - calls_before < task_steps


def test_an_all_black_mask_keeps_the_picture(cascade):
    """Inpainting repaints only under the mask: with none, stage I returns the picture it was given."""
    image = picture()
    black = PIL.Image.new("L", image.size, 0)
    params = InpaintParams(prompt="anything", seed=1, size=64, stage1_steps=4)
    result = cascade.generate(params, EditImages(image, black))
    expected = IFImg2ImgPipeline.preprocess_image(cascade.stages["stage1"].pipe, image)
    assert torch.equal(result.tensors[64], expected)


@pytest.mark.parametrize(
    "params,edit,param",
    [
        (Img2ImgParams(prompt="a", size=64), EditImages(picture().crop((0, 0, 96, 64))), "image"),
        (InpaintParams(prompt="a", size=64), EditImages(picture(), grey_mask(64)), "mask"),
        (
            Img2ImgParams(prompt="a", size=64, stage1_steps=2, stage1_strength=0.3),
            EditImages(picture()),
            "stage1_strength",
        ),
        (GenerationParams(prompt="a", size=64), EditImages(picture()), "image"),
        (InpaintParams(prompt="a", size=64), EditImages(picture()), "mask"),
        (Img2ImgParams(prompt="a", size=64), None, "image"),
    ],
)
def test_bad_edits_are_refused_naming_the_field(cascade, params, edit, param):
    with pytest.raises(InvalidParameter) as err:
        cascade.generate(params, edit)
    assert err.value.param == param


# ---- uploaded pictures ------------------------------------------------------------------------------
def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels: signature, IHDR, a tiny IDAT, IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    "data,message",
    [
        (png(picture())[:300], "cannot be decoded"),
        (_png_header(50000, 50000), "pixels"),
        (b"%PDF-1.4 not a picture at all" * 20, "is not a PNG, JPEG or WEBP picture"),
        (b"", "is empty"),
    ],
)
def test_unreadable_pictures_are_refused_naming_the_field(data, message):
    with pytest.raises(InvalidParameter) as err:
        read_picture(data, "image")
    assert err.value.param == "image" and message in str(err.value)


def test_the_pixel_bound_is_checked_from_the_header():
    with pytest.raises(InvalidParameter, match="5000x5000, more than"):
        read_picture(_png_header(5000, 5000), "mask", max_pixels=4096 * 4096)


def test_both_mask_conventions_become_diffusers_grey_mask():
    alpha = np.asarray(to_mask(alpha_mask()))
    assert alpha[30, 50] == 255 and alpha[0, 0] == 0  # transparent is repainted
    grey = np.asarray(to_mask(grey_mask().convert("RGB")))
    assert np.array_equal(grey, np.asarray(grey_mask()))  # white is repainted
    opaque = PIL.Image.fromarray(np.dstack([np.asarray(grey_mask().convert("RGB")), np.full((96, 96), 255, np.uint8)]))
    assert np.array_equal(np.asarray(to_mask(opaque)), np.asarray(grey_mask()))  # no transparency: grey


def test_read_edit_refuses_a_mask_of_another_size_and_a_non_square_image():
    with pytest.raises(InvalidParameter, match="must match") as err:
        read_edit(png(picture()), png(grey_mask(64)))
    assert err.value.param == "mask"
    with pytest.raises(InvalidParameter, match="square") as err:
        read_edit(png(picture().crop((0, 0, 96, 50))))
    assert err.value.param == "image"
    edit = read_edit(png(picture().convert("RGBA")), png(alpha_mask()))
    assert edit.image.mode == "RGB" and edit.mask.mode == "L"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: none on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] if torch.cuda.is_available() else [None])
def test_on_cuda_edits_sharing_steps_with_text_to_image_equal_each_alone(tiny_checkpoints, dtype):
    """On a GPU an edit's scheduler holds its scalars on the device (`add_noise` moves them): edits and a
    text-to-image request stepped together still give each request's own bits."""
    from stages.cascade import Cascade

    cuda = Cascade.from_checkpoints(tiny_checkpoints, device="cuda", torch_dtype=dtype)
    requests = [GenerationParams(prompt="a lighthouse at dusk", seed=21, **FAST), *(p for p, _, _ in CASES)]
    edits = [None, *(EditImages(image, mask) for _, image, mask in CASES)]
    together = cuda.generate_many(requests, edits=edits, max_batch_size=8)
    for params, edit, result in zip(requests, edits, together, strict=True):
        alone = cuda.generate(params, edit)
        for size, tensor in alone.tensors.items():
            assert torch.equal(tensor, result.tensors[size]), (size, params.seed)
