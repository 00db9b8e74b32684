#!/usr/bin/env bash
# The prepared GPU probe (benchmarks/gpu/probe.py): measures the cascade on this machine in one time-boxed
# run and writes profile.json, summary.json and summary.md into --out.
#
#   benchmarks/gpu/probe.sh [--device cuda|cpu] [--preset full|small|tiny] [--out DIR] [--budget-s N] [...]
#
# Defaults: cuda, full (IF's real architecture, random float16 weights built on the GPU), out/probe, 450 s.
# Needs python with torch, diffusers, transformers, accelerate and sentencepiece; pydantic and protobuf are
# installed from benchmarks/gpu/wheels/ (fill it with fetch_wheels.sh on a machine with network) when
# missing. Nothing is downloaded, nothing is written but --out. PYTHON picks the interpreter.
set -euo pipefail

PROBE_T0=$(date +%s.%N)
export PROBE_T0
PROBE_COMMAND="$0$(printf " %q" "$@")"
export PROBE_COMMAND
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
python=${PYTHON:-python3}

if ! "$python" -c 'import pydantic, google.protobuf' 2>/dev/null; then
    if ! ls "$here"/wheels/*.whl >/dev/null 2>&1; then
        echo "probe.sh: pydantic or protobuf is missing and $here/wheels has no wheels (run fetch_wheels.sh)" >&2
        exit 2
    fi
    echo "probe.sh: installing pydantic and protobuf from $here/wheels" >&2
    "$python" -m pip install --quiet --no-index --find-links "$here/wheels" pydantic protobuf >&2
fi

cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
exec "$python" -m benchmarks.gpu.probe "$@"
