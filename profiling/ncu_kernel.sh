#!/usr/bin/env bash
# Nsight Compute: every metric section (--set full) for ONE launch of one CUDA kernel.
#
# usage: profiling/ncu_kernel.sh [KERNEL_REGEX]      (default flash_fwd_kernel)
#   BENCH=path (default build-cuda/gpu_bench_kernels)  OUT=report name (default ncu_<kernel>)
#   SKIP=launches of the kernel to skip first (default 2: past the correctness check and the
#        first timed launch, so the profiled one is warm)
#
# The driver is the kernel benchmark (bench/gpu/bench_kernels.cu, --quick sizes): it runs the
# product's kernels, checked against the CPU reference, so the profiled launch is a correct
# one. Kernel names are those of kernels/*.cu (__global__ functions), e.g. flash_fwd_kernel,
# flash_bwd_dq_kernel, ln_forward_kernel, gelu_kernel, adamw_kernel, softmax_loss_kernel.
# ncu serializes launches, locks clocks to base (--clock-control base) and flushes caches
# before each profiled launch (--cache-control all): compare its durations with each other,
# not with the benchmark's.
#
# Read the report: ncu-ui $OUT.ncu-rep, or `ncu --import $OUT.ncu-rep --page details`. Start
# with "GPU Speed Of Light Throughput" (compute vs memory bound against the roofline), then
# "Memory Workload Analysis" (DRAM/L2 traffic, bank conflicts) and "Warp State Statistics"
# (stall reasons); --import-source yes puts the source beside the SASS (build with -lineinfo,
# which remat's CUDA build does).
set -euo pipefail

KERNEL=${1:-flash_fwd_kernel}
BENCH=${BENCH:-build-cuda/gpu_bench_kernels}
OUT=${OUT:-ncu_${KERNEL}}
SKIP=${SKIP:-2}

ncu \
  --kernel-name "regex:${KERNEL}" \
  --launch-skip "$SKIP" --launch-count 1 \
  --set full \
  --import-source yes \
  --force-overwrite \
  --export "$OUT" \
  "$BENCH" --quick

ncu --import "$OUT.ncu-rep" --page details --section SpeedOfLight
