#!/usr/bin/env bash
# Builds longnet on a GPU machine, runs the GPU tests, and optionally the attention benchmark.
#
#   tools/gpu-build.sh [--build-dir DIR] [--bench JSON] [--bench-args "ARGS"] [--skip-tests]
#
# Torch comes from the machine's Python (LONGNET_PYTHON, default /opt/torch/.venv/bin/python3; its CMake files from
# torch.utils.cmake_prefix_path). Media decoding is off (-DLONGNET_MEDIA=OFF): GPU machines have no OpenCV, FFmpeg
# or SentencePiece. They may also lack the header libraries the build needs (Catch2 v2, toml++, CLI11, spdlog, fmt,
# nlohmann-json). Those travel as Debian packages in .deps/ (git-ignored via .git/info/exclude), downloaded on the
# development machine (Debian 12) with
#   mkdir -p .deps && cd .deps && apt-get download catch2 libtomlplusplus-dev libcli11-dev libspdlog-dev \
#       libfmt-dev nlohmann-json3-dev libspdlog1.10 libfmt9 libtomlplusplus3 zlib1g-dev zlib1g
# and carried with the working tree; here they are unpacked with `dpkg -x` into a private prefix (never into /) that
# goes on CMAKE_PREFIX_PATH, with its shared libraries (spdlog, fmt, toml++) on LD_LIBRARY_PATH. Packages the
# machine already has are used as they are.
#
# Exit status: non-zero when the build, a GPU test or a benchmark correctness check fails.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BUILD_DIR=$ROOT/build-gpu
BENCH_JSON=""
BENCH_ARGS=""
RUN_TESTS=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --build-dir) BUILD_DIR=$2; shift 2 ;;
    --bench) BENCH_JSON=$2; shift 2 ;;
    --bench-args) BENCH_ARGS=$2; shift 2 ;;
    --skip-tests) RUN_TESTS=0; shift ;;
    *) echo "gpu-build.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

PYTHON=${LONGNET_PYTHON:-/opt/torch/.venv/bin/python3}
TORCH_PREFIX=$("$PYTHON" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)')
echo "torch: $("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")')"

PREFIX_PATH=$TORCH_PREFIX
DEPS_PREFIX=${LONGNET_DEPS_PREFIX:-/tmp/longnet-deps}
if compgen -G "$ROOT/.deps/*.deb" > /dev/null; then
  mkdir -p "$DEPS_PREFIX"
  for deb in "$ROOT"/.deps/*.deb; do dpkg -x "$deb" "$DEPS_PREFIX"; done
  PREFIX_PATH="$PREFIX_PATH;$DEPS_PREFIX/usr"
  export LD_LIBRARY_PATH="$DEPS_PREFIX/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# LONGNET_PCH=OFF: with 16 cores the handful of torch translation units built here compile in parallel faster than
# the precompiled header alone takes. LONGNET_CMAKE_ARGS adds or overrides options.
# shellcheck disable=SC2086  # LONGNET_CMAKE_ARGS is a list of options
cmake -S "$ROOT" -B "$BUILD_DIR" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release \
  -DLONGNET_MEDIA=OFF \
  -DLONGNET_CUDA=ON \
  -DLONGNET_WERROR=ON \
  -DLONGNET_PCH=OFF \
  -DCMAKE_PREFIX_PATH="$PREFIX_PATH" \
  ${LONGNET_CMAKE_ARGS:-}
# Only what the GPU run needs: the GPU test suite and the standalone benchmark (`bench_attention` takes the options
# of `longnet bench attention`).
# GPU time is scarce: when the build fails with warnings as errors (this machine's compiler may be newer than CI's),
# it is retried without -Werror so that the tests and the benchmark still run, and the script exits 1 at the end.
STATUS=0
if ! ninja -C "$BUILD_DIR" -j "$(nproc)" attention_gpu_tests encoders_gpu_tests fusion_gpu_tests pipelines_gpu_tests \
    bench_attention; then
  echo "gpu-build.sh: build with -Werror failed; retrying with LONGNET_WERROR=OFF" >&2
  STATUS=1
  cmake -B "$BUILD_DIR" -DLONGNET_WERROR=OFF
  ninja -C "$BUILD_DIR" -j "$(nproc)" attention_gpu_tests encoders_gpu_tests fusion_gpu_tests pipelines_gpu_tests \
    bench_attention
fi

if [[ $RUN_TESTS == 1 ]]; then
  (cd "$BUILD_DIR" && ctest -L gpu --output-on-failure)
fi

if [[ -n $BENCH_JSON ]]; then
  COMMIT=${LONGNET_GIT_COMMIT:-$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)}
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
  "$BUILD_DIR/bin/bench_attention" --json "$BENCH_JSON" --commit "$COMMIT" $BENCH_ARGS
fi
exit $STATUS
