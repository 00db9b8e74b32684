"""The `ifserve` console script end to end: write checkpoints, generate, compare with the reference."""

import shutil
import subprocess

import numpy as np
import PIL.Image

from stages.families.deepfloyd_if import GenerationParams
from stages.images import to_pil
from tests.reference import load_reference, reference_cascade


def test_checkpoints_then_generate_matches_reference(tmp_path):
    ifserve = shutil.which("ifserve")
    assert ifserve, "the package is not installed (pip install -e .)"
    root = tmp_path / "ck"
    done = subprocess.run(
        [ifserve, "checkpoints", "--preset", "tiny", "--out", str(root)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "wrote the tiny preset" in done.stdout

    out = tmp_path / "img" / "bike.png"
    args = [
        "--prompt",
        "A red bicycle",
        "--negative-prompt",
        "blurry",
        "--seed",
        "42",
        "--size",
        "256",
        "--stage1-steps",
        "8",
        "--stage1-guidance",
        "6.5",
        "--stage2-timesteps",
        "smart27",
        "--stage2-noise-level",
        "150",
    ]
    done = subprocess.run(
        [ifserve, "generate", "--checkpoints", str(root), *args, "--out", str(out), "--save-stages"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "stage1:" in done.stdout and "stage2:" in done.stdout and "stage3" not in done.stdout

    params = GenerationParams(
        prompt="A red bicycle",
        negative_prompt="blurry",
        seed=42,
        size=256,
        stage1_steps=8,
        stage1_guidance=6.5,
        stage2_timesteps="smart27",
        stage2_noise_level=150,
    )
    reference, _ = reference_cascade(load_reference(root), params)
    written = np.asarray(PIL.Image.open(out), dtype=np.int16)
    assert written.shape == (256, 256, 3)
    assert np.abs(written - np.asarray(to_pil(reference[256]), dtype=np.int16)).max() <= 1
    stage1 = np.asarray(PIL.Image.open(out.with_name("bike-64.png")), dtype=np.int16)
    assert np.abs(stage1 - np.asarray(to_pil(reference[64]), dtype=np.int16)).max() <= 1
