"""`ifserve profile`, `generate`, `checkpoints` and `estimate` run without the serving stack (issue 27): no
Ray, SQLAlchemy or FastAPI, none of serve's tenancy, batch or HTTP modules, in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SERVING = ("ray", "sqlalchemy", "fastapi", "serve.tenancy", "serve.batch", "serve.http_app", "serve.deployments")

CHECK = """
import json, sys
from serve.cli import main

for argv in {helps!r}:
    try:
        main(argv)
    except SystemExit:
        pass
# what those commands import when they run (serve/cli.py, serve/cli_capacity.py import them lazily)
import stages.cascade, stages.checkpoints, stages.pictures, stages.profiling, serve.planner
for argv in {runs!r}:
    assert main(argv) == 0, argv
serving = {serving!r}
print(json.dumps(sorted(m for m in sys.modules if m in serving or m.startswith(tuple(s + "." for s in serving)))))
"""


def _loaded(helps: list[list[str]], runs: list[list[str]]) -> list[str]:
    code = CHECK.format(helps=helps, runs=runs, serving=SERVING)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_profile_generate_and_checkpoints_import_no_serving_stack(tmp_path):
    root = str(tmp_path / "ck")
    helps = [[command, "--help"] for command in ("profile", "estimate", "generate", "checkpoints", "plan")]
    runs = [
        ["checkpoints", "--preset", "tiny", "--out", root],
        ["generate", "--checkpoints", root, "--prompt", "a red bicycle", "--size", "64", "--stage1-steps", "2",
         "--threads", "1", "--out", str(tmp_path / "bike.png")],
    ]  # fmt: skip
    assert _loaded(helps, runs) == []
    assert (tmp_path / "bike.png").is_file()


def test_profile_with_random_weights_reads_no_checkpoint_and_no_serving_stack(tmp_path):
    """`ifserve profile --random-weights`: the preset's models built in memory (on a GPU: in float16 on
    the device, IF's full preset never touching the disk), profiled through the same engines."""
    out = tmp_path / "profile.json"
    runs = [
        ["profile", "--random-weights", "--preset", "tiny", "--batch-sizes", "1", "--repeats", "1",
         "--threads", "1", "--batch-invariance", "per_task", "--out", str(out)],
    ]  # fmt: skip
    assert _loaded([], runs) == []
    profile = json.loads(out.read_text())
    assert profile["random_weights"] is True and profile["invariance"] == "per_task" and profile["preset"] == "tiny"
    assert len(profile["stages"]) == 3 and all(s["step_s"]["1"]["1"] > 0 for s in profile["stages"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.json"]  # no checkpoint folder was written
