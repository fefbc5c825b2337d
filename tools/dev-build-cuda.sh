#!/usr/bin/env bash
# Compile-check the CUDA build (no GPU needed) into build-cuda/ with the CUDA
# torch venv: /work/venv-cuda by default, or $1.  Archs as in CI (80;90a);
# LRO_ARCHS=90a halves the time for a quick check.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${1:-/work/venv-cuda}"
if [[ ! -f build-cuda/build.ninja ]]; then
  cmake -S . -B build-cuda -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWRANK_OPS_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES="${LRO_ARCHS:-80;90a}" -DPython_EXECUTABLE="$VENV/bin/python" >/dev/null
fi
cmake --build build-cuda
