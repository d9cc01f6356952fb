// RMSNorm (the Llama family's normalization), plain and fused with the residual add that
// precedes it: out = inp * rstd * w with rstd = 1 / sqrt(mean(inp^2) + eps). No bias, no mean.
#pragma once

namespace remat::cpu {

// out (N, C) = inp * rstd * w; rstd (N) is written when not null. Statistics in fp64 on the
// CPU reference, each row's sum of squares accumulated in channel order.
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                     float eps);

// residual (N, C) = x + y, then out = RMSNorm(residual). The outputs are bitwise equal to
// writing residual first and calling rmsnorm_forward(residual): recompute relies on it.
void residual_rmsnorm_forward(float* residual, float* out, float* rstd, const float* x,
                              const float* y, const float* w, int N, int C, float eps);

// dinp (N, C) += ; dw (C) += (deterministic: rows summed in order). Uses the forward's inp and
// rstd.
void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                      const float* rstd, int N, int C);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>

namespace remat::cuda {

// out (N, C) = inp * rstd * w (statistics in fp32); rstd (N) fp32, written when not null.
// C % 8 == 0, C <= 16384.
template <typename Elem>
void rmsnorm_forward(Elem* out, float* rstd, const Elem* inp, const Elem* w, int N, int C,
                     float eps, cudaStream_t stream);

// residual (N, C) = x + y (rounded to Elem), out = RMSNorm(residual): bitwise equal to writing
// residual and calling rmsnorm_forward on it.
template <typename Elem>
void residual_rmsnorm_forward(Elem* residual, Elem* out, float* rstd, const Elem* x, const Elem* y,
                              const Elem* w, int N, int C, float eps, cudaStream_t stream);

// Scratch floats rmsnorm_backward needs (per-block partial dw).
size_t rmsnorm_backward_workspace_floats(int N, int C);

// dinp (N, C) +=; dw (C) += (fp32 partials per block summed in block order: deterministic).
template <typename Elem>
void rmsnorm_backward(Elem* dinp, Elem* dw, const Elem* dout, const Elem* inp, const Elem* w,
                      const float* rstd, int N, int C, float* workspace, cudaStream_t stream);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
