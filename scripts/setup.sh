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
# PCRE2: the Unicode pre-tokenizer regex of Hugging Face tokenizers.
for pkg in cmake ninja-build g++ libgtest-dev fortunes nlohmann-json3-dev libpcre2-dev pkg-config; do
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

build="${REMAT_BUILD_DIR:-build}"
# shellcheck disable=SC2086
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release ${REMAT_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j "$(nproc)" ${1:+--target "$@"}
echo "setup: built ${*:-everything} in $build"
