#!/usr/bin/env bash
# Installs what remat needs on a fresh Debian/Ubuntu machine (only what is missing), then
# configures and builds into build/. Safe to run again: it only rebuilds what changed.
#   bash scripts/setup.sh            everything (program, tests, benchmarks, CUDA sources)
#   bash scripts/setup.sh remat      only the remat program
#   REMAT_BUILD_DIR   build directory (default: build)
#   REMAT_CMAKE_ARGS  extra arguments for cmake's configure step
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# nlohmann-json: JSON reading and writing (config.json, tokenizer.json, traces, plan --json);
# PCRE2: the Unicode pre-tokenizer regex of Hugging Face tokenizers; Open MPI: data parallel
# (mpirun -np N remat train) and the CPU backend's collectives.
for pkg in cmake ninja-build g++ libgtest-dev fortunes nlohmann-json3-dev libpcre2-dev pkg-config \
    openmpi-bin libopenmpi-dev; do
  have_pkg "$pkg" || need+=("$pkg")
done
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The independent reference check (tests/reference) needs numpy.
if ! python3 -c "import numpy" 2>/dev/null; then
  echo "setup: installing numpy for the reference tests"
  python3 -m pip install --quiet numpy 2>/dev/null ||
    DEBIAN_FRONTEND=noninteractive ${SUDO:-} apt-get install -y -qq python3-numpy >/dev/null || true
fi

# The tokenizer tests compare against Hugging Face `tokenizers` (PyPI); skipped when absent.
if ! python3 -c "import tokenizers" 2>/dev/null; then
  echo "setup: installing tokenizers for the tokenizer tests"
  python3 -m pip install --quiet tokenizers 2>/dev/null || echo "setup: tokenizers not installed; its tests will skip"
fi

# cuDNN's fused attention (--attention cudnn) is built through cudnn-frontend's header-only C++
# API, which PyPI's nvidia-cudnn-frontend wheel ships under include/: fetched into
# third_party/cudnn_frontend (git-ignored) when the CUDA toolkit (with its cuDNN) is here.
# Offline, or without a wheel for this Python, the build goes on without cuDNN attention.
CUDNN_FE_VERSION=1.32.0
fe_dir=third_party/cudnn_frontend
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  have_fe=$(sed -n 's/^#define CUDNN_FRONTEND_\(MAJOR\|MINOR\|PATCH\)_VERSION \([0-9]*\).*/\2/p' \
    "$fe_dir/include/cudnn_frontend_version.h" 2>/dev/null | paste -sd. || true)
  if [ "$have_fe" != "$CUDNN_FE_VERSION" ]; then
    fe_tmp=$(mktemp -d)
    if python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$fe_tmp" \
         "nvidia-cudnn-frontend==$CUDNN_FE_VERSION" >/dev/null 2>&1 &&
       python3 - "$fe_tmp" "$fe_dir" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "*.whl"))[0]
stage = os.path.join(tmp, "x")
with zipfile.ZipFile(wheel) as z:
    z.extractall(stage, [n for n in z.namelist() if n.startswith("include/")])
assert os.path.isfile(os.path.join(stage, "include", "cudnn_frontend.h")), "no include/ in the wheel"
shutil.rmtree(dest, ignore_errors=True)
os.makedirs(dest)
shutil.move(os.path.join(stage, "include"), os.path.join(dest, "include"))
PY
    then
      echo "setup: cudnn-frontend $CUDNN_FE_VERSION headers in $fe_dir/include"
    else
      echo "setup: cudnn-frontend headers not fetched (offline?): building without --attention cudnn"
    fi
    rm -rf "$fe_tmp"
  fi
fi

build="${REMAT_BUILD_DIR:-build}"
# shellcheck disable=SC2086
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release ${REMAT_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j "$(nproc)" ${1:+--target "$@"}
echo "setup: built ${*:-everything} in $build"
