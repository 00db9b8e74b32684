#!/usr/bin/env bash
# Fill benchmarks/gpu/wheels/ with what probe.sh installs on a GPU machine that has only torch, diffusers,
# transformers, accelerate and sentencepiece and no network: pydantic (stages/params.py) and protobuf
# (transformers converts the T5 sentencepiece tokenizer with it), with their dependencies, as binary
# wheels for linux x86_64 and each Python version in PYTHONS (default: this one and 3.10-3.13).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python3}
current=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
mkdir -p "$here/wheels"
for version in ${PYTHONS:-$current 3.10 3.11 3.12 3.13}; do
    "$python" -m pip download --quiet --only-binary=:all: --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --python-version "$version" \
        --dest "$here/wheels" 'pydantic>=2.6' 'protobuf>=4'
done
ls -1 "$here/wheels"
