#!/usr/bin/env bash
# Development build without installing: compile _C.so into build/ and link it
# into python/lowrank_ops/, so `PYTHONPATH=python pytest tests` runs this tree.
# Usage: tools/dev-build.sh [python]   (default: the python on PATH)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${1:-python}"
PYBIN="$(command -v "$PY")"
if [[ ! -f build/build.ninja ]]; then
  cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOWRANK_OPS_CUDA="${LOWRANK_OPS_CUDA:-AUTO}" \
        -DPython_EXECUTABLE="$PYBIN" >/dev/null
fi
cmake --build build
ln -sf ../../build/_C.so python/lowrank_ops/_C.so
