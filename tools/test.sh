#!/usr/bin/env bash
# Builds (installing what is missing, see tools/setup.sh) and runs every CPU test through ctest.
# GPU tests carry the label `gpu` and run on a GPU machine through tools/gpu-build.sh.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/tools/setup.sh" --build
build=${BUILD_DIR:-$repo/build}
ctest --test-dir "$build" -LE gpu --output-on-failure -j "${LONGNET_JOBS:-$(nproc)}"
