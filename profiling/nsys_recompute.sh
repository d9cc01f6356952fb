#!/usr/bin/env bash
# Nsight Systems timeline of a recompute run of `remat train`.
#
# usage: profiling/nsys_recompute.sh [extra remat train options...]
#   REMAT=path/to/remat (default build/remat)   OUT=report name (default remat_recompute)
#   e.g.  REMAT=build-rel/remat profiling/nsys_recompute.sh --model small --lookahead 2
#
# What the command records:
#   --trace=cuda,nvtx,osrt  CUDA API and kernels (CUDA backend), the NVTX ranges remat opens,
#                           OS runtime calls (the futex/condvar waits of the CPU streams);
#   --sample=none --cpuctxsw=none  no CPU sampling: the timeline stays readable;
#   the run itself is short (a few steps, evaluation of one batch, no sample, no checkpoint).
# To record only some steps, add: --capture-range=nvtx --nvtx-capture=step
# --capture-range-end=repeat:2 and run with NSYS_NVTX_PROFILER_REGISTER_ONLY=0 in the
# environment (remat's NVTX names are plain strings, not registered ones).
#
# What to look at in the timeline (open $OUT.nsys-rep in the Nsight Systems GUI):
# - The two named streams. On the CPU backend they are the threads "remat-main" and
#   "remat-recompute" (named with pthread and nvtxNameOsThread); on CUDA the streams of
#   the same names (nvtxNameCudaStream) under the GPU row. Each op is an NVTX range named
#   by its label (fwd.qkv, bwd.attention, recompute.gelu, ...) with the block index as the
#   range's payload, so `nsys stats --report nvtx_sum` groups every block under one name.
# - The host thread's ranges: step > forward.block / recompute.block / backward.block
#   (payload = block), classifier, optimizer. On the host they mark when the schedule was
#   issued; the worker (or GPU) rows show when it ran.
# - Recompute overlap: during backward.block l on remat-main, remat-recompute runs the
#   recompute.* ranges of block l-1 (look-ahead 1). Well hidden recompute ends before the
#   main stream's bwd.ln1 of block l.
# - The ready-event waits: a "wait" range on remat-main just before bwd.fcproj of a block is
#   the main stream waiting for that block's recompute (exposed recompute). Long ones mean the
#   side stream is the bottleneck: raise --lookahead or keep more (--recompute selective).
#   "wait" ranges on remat-recompute are the side stream waiting for the main stream (the
#   forward pass, or arena memory the main stream still uses).
# The in-process tracer gives the same picture without nsys: remat train --trace t.json
# (profiling/plot_trace.py draws it; t.overlap.json has the numbers). On CUDA it reads kernel
# times from CUPTI activity records, and nsys owns CUPTI while it profiles: under nsys the
# tracer falls back to cudaEvents around each op (remat says which on stderr). So this script
# passes no --trace; run the tracer without nsys.
set -euo pipefail

REMAT=${REMAT:-build/remat}
OUT=${OUT:-remat_recompute}

for arg in "$@"; do
  case "$arg" in
    --trace | --trace=*)
      echo "nsys_recompute.sh: --trace under nsys times ops with cudaEvents, not CUPTI" >&2
      ;;
  esac
done

nsys profile \
  --trace=cuda,nvtx,osrt \
  --sample=none --cpuctxsw=none \
  --force-overwrite=true \
  --output "$OUT" \
  "$REMAT" train --model mini --recompute full --steps 4 \
  --eval-every 0 --eval-batches 1 --sample-tokens 0 --out '' "$@"

# Time per NVTX range name (ops, blocks, waits), and the OS-runtime waits.
nsys stats --report nvtx_sum,osrt_sum "$OUT.nsys-rep"
