"""The prepared GPU probe (benchmarks/gpu/probe.sh) run here, on the CPU with the tiny preset: the code path
the GPU run takes (random weights built in memory, every invariance mode, the step sweep, the cascade
against the seed's code), its outputs' content, and that its process never imported the serving stack or
the tests. Also: random float16 weights are held as loading holds them (T5's `wo` layers in float32)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from stages.families import DEEPFLOYD_IF
from stages.families.deepfloyd_if.checkpoints import as_loaded, build_text_encoder
from stages.families.deepfloyd_if.presets import get_preset
from stages.profiling import Profile

ROOT = Path(__file__).resolve().parents[1]
MODES = ("split", "per_task", "off")
BATCHES = (1, 2)
TOL = 1e-4  # the exactness contract (tests/test_exactness.py)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    command = [
        "bash",
        str(ROOT / "benchmarks" / "gpu" / "probe.sh"),
        *("--device", "cpu", "--preset", "tiny", "--out", str(out)),
        *("--batch-sizes", ",".join(map(str, BATCHES)), "--cascade-images", "2", "--budget-s", "900"),
    ]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, json.loads((out / "summary.json").read_text())


def test_the_probe_ran_every_part_and_recorded_how(probe):
    out, summary = probe
    assert summary["complete"] and summary["errors"] == [] and summary["skipped"] == []
    assert {name: part["status"] for name, part in summary["parts"].items()} == dict.fromkeys(
        ("build", "invariance", "once", "steps", "cascade"), "done"
    )
    assert "benchmarks/gpu/probe.sh" in summary["command"] and "--preset tiny" in summary["command"]
    env = summary["environment"]
    assert env["device"] == "cpu" and env["cpu"]["model"] and env["cpu"]["cores"] >= 1
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["diffusers"] and env["versions"]["transformers"]
    assert (summary["family"], summary["preset"], summary["dtype"]) == ("deepfloyd-if", "tiny", "float32")
    assert 0 < summary["elapsed_s"] and summary["build_s"] > 0
    md = (out / "summary.md").read_text()
    assert summary["command"] in md and "Batch invariance" in md and "images/s" in md


def test_the_probes_process_never_imported_the_serving_stack_or_the_tests(probe):
    _, summary = probe
    imports = summary["imports"]
    assert imports["ok"] and imports["forbidden"] == []
    assert imports["project_modules"] and all(
        m.startswith("stages") or m in ("benchmarks", "benchmarks.gpu") for m in imports["project_modules"]
    ), imports["project_modules"]


def test_step_times_by_stage_mode_and_batch(probe):
    _, summary = probe
    names = ["text_encoder", *(spec.name for spec in DEEPFLOYD_IF.stages)]
    assert list(summary["stages"]) == names
    for name, stage in summary["stages"].items():
        assert stage["weights_bytes"] > 0, name
        assert set(stage["modes"]) == set(MODES), name
        for mode, rows in stage["modes"].items():
            assert sorted(map(int, rows)) == list(BATCHES), (name, mode)
            for b, row in rows.items():
                assert row["step_s"] > 0 and row["per_image_s"] == pytest.approx(row["step_s"] / int(b))
                assert row["activation_bytes"] is None  # measured on a GPU only
        if name != "text_encoder":
            assert stage["admit_s"] > 0 and stage["finish_s"] > 0 and stage["deliver_s"] > 0, name


def test_invariance_checked_bit_for_bit_for_every_mode(probe):
    _, summary = probe
    invariance = summary["invariance"]
    assert invariance["tasks"] == 4 and invariance["native_modes"]
    names = set(summary["stages"])
    for mode in MODES:
        by = invariance["modes"][mode]
        assert set(by) == names, mode
        for row in by.values():
            assert isinstance(row["equal"], bool) and row["max_abs_diff"] >= 0 and row["nonfinite"] == 0
    # Both invariant modes hold bit for bit here (as tests/test_batch_invariance.py checks on this CPU).
    for mode in ("split", "per_task"):
        assert invariance["holds"][mode], invariance["modes"][mode]
        assert all(r["equal"] and r["max_abs_diff"] == 0 for r in invariance["modes"][mode].values())


def test_the_cascade_against_the_seeds_code(probe):
    _, summary = probe
    cascade = summary["cascade"]
    assert cascade["default_steps"] is False  # tiny on a CPU: 2 steps a stage, and the summary says so
    assert cascade["steps"] == {spec.name: 2 for spec in DEEPFLOYD_IF.stages}
    assert cascade["family_default_steps"] == {"stage1": 100, "stage2": 50, "stage3": 75}
    assert cascade["images"] == 2 and cascade["size"] == 1024
    reference = cascade["reference"]
    assert reference["images"] == 2 and reference["images_per_s"] > 0
    assert set(cascade["by_mode"]) == set(MODES)
    for mode, row in cascade["by_mode"].items():
        assert row["errors"] == [] and row["images_per_s"] > 0, mode
        assert row["vs_reference"] == pytest.approx(row["images_per_s"] / reference["images_per_s"])
        assert set(row["max_abs_diff_vs_reference"]) == {"64", "256", "1024"}, mode
    for mode in ("split", "per_task"):  # the exactness contract, the probe's own images
        assert max(cascade["by_mode"][mode]["max_abs_diff_vs_reference"].values()) <= TOL, mode


def test_the_profile_is_one_the_planner_reads(probe):
    out, summary = probe
    profile = Profile.load(out / "profile.json")
    assert (profile.family, profile.preset, profile.dtype) == ("deepfloyd-if", "tiny", "float32")
    assert profile.random_weights and profile.invariance == "split" and profile.batch_invariant
    assert profile.command == summary["command"]
    assert set(profile.stages) == {spec.name for spec in DEEPFLOYD_IF.stages}
    for name, stage in [("text_encoder", profile.encoder), *profile.stages.items()]:
        ((threads, row),) = stage.step_s.items()
        assert sorted(row) == list(BATCHES)
        assert row == stage.step_s_by_invariance["split"]
        assert set(stage.step_s_by_invariance) == set(MODES)
        assert stage.weights_bytes == summary["stages"][name]["weights_bytes"]
    assert profile.stages["stage3"].output_size == 1024 and profile.stages["stage3"].finish_s

    from serve.planner import plan

    assert len(plan(profile).stages) == 1 + len(DEEPFLOYD_IF.stages)  # `ifserve plan --profile` reads it


def test_random_float16_weights_are_held_as_loading_holds_them():
    """transformers keeps T5's `wo` layers in float32 when it loads in float16; the in-memory build does
    too, so float16 T5 is counted at its real size."""
    from transformers import T5EncoderModel

    preset = get_preset("tiny")
    with tempfile.TemporaryDirectory() as tmp:
        build_text_encoder(preset).save_pretrained(tmp)
        loaded = T5EncoderModel.from_pretrained(tmp, torch_dtype=torch.float16)
    built = as_loaded(build_text_encoder(preset), torch.float16)
    assert {n: p.dtype for n, p in built.named_parameters()} == {n: p.dtype for n, p in loaded.named_parameters()}
    assert {n.split(".")[-2] for n, p in built.named_parameters() if p.dtype == torch.float32} == {"wo"}

    # The real T5-v1.1-XXL encoder, on the meta device: ~11.5 GB in float16, ~9.5 GB if `wo` were float16.
    with torch.device("meta"):
        xxl = as_loaded(build_text_encoder(get_preset("full")), torch.float16)
    total = sum(p.numel() * p.element_size() for p in xxl.parameters())
    wo = sum(p.numel() for n, p in xxl.named_parameters() if ".wo." in n)
    assert total == 2 * sum(p.numel() for p in xxl.parameters()) + 2 * wo
    assert 11.0e9 < total < 12.0e9
