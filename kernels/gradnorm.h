// Global gradient norm and clipping.
#pragma once
#include <cstddef>

namespace remat::cpu {

// Sum of squares of g (n) in double; deterministic (fixed blocking, summed in block order).
double sum_squares(const float* g, size_t n);

// The factor clipping multiplies gradients by: min(1, max_norm / (norm + 1e-6)); 1 when
// max_norm <= 0 (clipping off) or norm is not finite.
float clip_scale(double norm, float max_norm);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace remat::cuda {

// Scratch floats sum_squares needs (one partial per block of the first pass).
size_t gradnorm_workspace_floats();

// out (device scalar, fp32) = sum of squares of g (n) when accumulate == false, += when
// true (to combine several buffers). Deterministic two-pass reduction: a fixed grid of
// blocks writes fp32 partials; one block sums them in order in double.
template <typename Elem>
void sum_squares(float* out, const Elem* g, size_t n, float* workspace, bool accumulate,
                 cudaStream_t stream);

// scale (device scalar) = min(1, max_norm / (sqrt(*sum_sq) + 1e-6)); 1 when max_norm <= 0 or
// the norm is not finite. norm (device scalar), when not null, = sqrt(*sum_sq).
void clip_scale(float* scale, float* norm, const float* sum_sq, float max_norm,
                cudaStream_t stream);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
