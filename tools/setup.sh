#!/usr/bin/env bash
# Installs everything longnet needs on a fresh Debian 12 machine (as root), builds it, and optionally runs the
# quickstart experiment. Idempotent: a second run only rebuilds what changed.
#
#   tools/setup.sh            install + build + run experiments/quickstart.toml
#   tools/setup.sh --build    install + build only (what tools/test.sh uses)
#
# Environment: LONGNET_HOME (default ~/.cache/longnet) holds the Python virtual environment with torch 2.11.0 from
# PyPI, whose LibTorch we build against; BUILD_DIR (default build/); LONGNET_JOBS (default: all cores).
set -euo pipefail

mode=run
case "${1:-}" in
  --build) mode=build ;;
  "") ;;
  *) echo "usage: tools/setup.sh [--build]" >&2; exit 2 ;;
esac

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
home=${LONGNET_HOME:-$HOME/.cache/longnet}
venv=$home/venv
build=${BUILD_DIR:-$repo/build}
jobs=${LONGNET_JOBS:-$(nproc)}
torch_version=2.11.0
export CCACHE_DIR=${CCACHE_DIR:-$home/ccache}
export PIP_CACHE_DIR=${PIP_CACHE_DIR:-$home/pip-cache}

step() { printf '\n== %s\n' "$*"; }

# ---- system packages ------------------------------------------------------------------------------------------
packages=(build-essential cmake ninja-build ccache pkg-config python3-venv
          libopencv-dev libavformat-dev libavcodec-dev libswscale-dev libswresample-dev libavutil-dev
          libsentencepiece-dev libtomlplusplus-dev catch2 libcli11-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
          zlib1g-dev ffmpeg espeak-ng)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  step "apt-get install ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# ---- torch from PyPI in a virtual environment outside the source tree ------------------------------------------
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
  step "torch==$torch_version into $venv"
  mkdir -p "$home"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q "torch==$torch_version" numpy
fi
# Independent implementations the tests check our files and numbers against: tensorboard reads our event files,
# librosa computes the reference log-mel spectrogram, safetensors reads our embedding files.
if ! "$venv/bin/python" -c "import tensorboard, librosa, safetensors, numpy" 2>/dev/null; then
  step "tensorboard, librosa and safetensors into $venv"
  "$venv/bin/pip" install -q tensorboard librosa safetensors
fi
torch_prefix=$("$venv/bin/python" -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null)

# ---- configure and build ---------------------------------------------------------------------------------------
mkdir -p "$build"; log=$build/configure.log
step "configure $build"
cmake -S "$repo" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix" \
  -DPython3_EXECUTABLE="$venv/bin/python" \
  -DLONGNET_WERROR=ON ${LONGNET_CMAKE_ARGS:-} >"$log" 2>&1 || { cat "$log"; exit 1; }
grep -A12 "enabled:" "$log" | sed -n '1,12p' || true
step "build ($jobs jobs)"
cmake --build "$build" -j "$jobs"

if [ "$mode" = run ]; then
  # The quickstart: the demo dataset made on this machine, its shards, then training with held-out retrieval.
  cd "$repo"
  step "tools/make_demo_dataset.py --out data/demo"
  "$venv/bin/python" tools/make_demo_dataset.py --out data/demo --jobs "$jobs" --progress-every 100
  step "longnet prepare experiments/quickstart.toml"
  "$build/bin/longnet" prepare experiments/quickstart.toml
  step "longnet run experiments/quickstart.toml"
  "$build/bin/longnet" run experiments/quickstart.toml
fi
