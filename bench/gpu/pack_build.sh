#!/usr/bin/env bash
# Builds the GPU programs here for carrying to the lent GPU machine, and gathers them into one
# small folder (the device tool carries at most 64 MiB):
#
#   bash bench/gpu/pack_build.sh [ARCH]      # ARCH: CUDA architecture, default 90 (H100/H200)
#
# The build is REMAT_PORTABLE (no -march=native; libstdc++, libgcc and libgomp static; CUPTI
# copied beside the programs, found through RUNPATH $ORIGIN; cuBLASLt from the CUDA install
# there). Result: build-carry/ with remat, gpu_bench_kernels, the gpu_test_* programs and
# libcupti. On the GPU machine:
#
#   bash bench/gpu_check.sh --build build-carry --no-build --pack
#
# gpu_check.sh falls back to building there when the carried programs do not start.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ARCH="${1:-90}"
BUILD="$ROOT/build-gpu"
CARRY="$ROOT/build-carry"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DREMAT_CUDA=ON \
  -DREMAT_PORTABLE=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" >/dev/null
targets=(remat gpu_bench_kernels)
for f in "$ROOT"/tests/gpu/test_*.cu "$ROOT"/tests/gpu/test_*.cpp; do
  [[ -f "$f" ]] && { f="${f##*/}"; targets+=("gpu_${f%.*}"); }
done
cmake --build "$BUILD" -j "$(nproc)" --target "${targets[@]}"
rm -rf "$CARRY"
mkdir -p "$CARRY"
for t in "${targets[@]}"; do cp "$BUILD/$t" "$CARRY/"; done
cp -P "$BUILD"/libcupti.so* "$CARRY/" 2>/dev/null || true
echo "arch sm_$ARCH, commit $(git -C "$ROOT" rev-parse --short HEAD)$(git -C "$ROOT" diff --quiet || echo '+dirty')" \
  >"$CARRY/BUILD_INFO"
du -sh "$CARRY"
ls "$CARRY"
