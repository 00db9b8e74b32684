"""`ifserve ARGS` run in the test's own process: a fresh `ifserve` process spends about 6 s on this box
importing torch and diffusers before it reads its arguments, and the CLI tests call it many times.
`tests/test_serve_cli.py` runs the real entry point as a process."""

from __future__ import annotations

import io
import subprocess
from contextlib import redirect_stderr, redirect_stdout

from serve.cli import main


def ifserve(*args: str) -> subprocess.CompletedProcess:
    """The exit code and what was printed, as `subprocess.run(..., capture_output=True, text=True)` gives."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit:  # argparse's own errors
            code = exit.code if isinstance(exit.code, int) else 1
    return subprocess.CompletedProcess(["ifserve", *args], code, out.getvalue(), err.getvalue())
