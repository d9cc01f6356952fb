// LayerNorm, plain and fused with the residual add that precedes it.
#pragma once

namespace remat::cpu {

// out (N, C) = (inp - mean) * rstd * w + b, eps 1e-5; mean, rstd (N) are written when not null.
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int N, int C);

// residual (N, C) = x + y, then out = LayerNorm(residual). The outputs are bitwise equal to
// writing residual first and calling layernorm_forward(residual): recompute relies on it.
void residual_layernorm_forward(float* residual, float* out, float* mean, float* rstd,
                                const float* x, const float* y, const float* w, const float* b,
                                int N, int C);

// dinp (N, C) += ; dw, db (C) += (deterministic: one thread per channel, rows in order).
// Uses the forward's inp, mean and rstd.
void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int N, int C);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace remat::cuda {

// out (N, C) = LayerNorm(inp) * w + b (eps 1e-5, statistics in fp32); mean, rstd (N) fp32,
// written when not null. C % 8 == 0, C <= 16384.
template <typename Elem>
void layernorm_forward(Elem* out, float* mean, float* rstd, const Elem* inp, const Elem* w,
                       const Elem* b, int N, int C, cudaStream_t stream);

// residual (N, C) = x + y (rounded to Elem), out = LayerNorm(residual): bitwise equal to
// writing residual and calling layernorm_forward on it (same code path).
template <typename Elem>
void residual_layernorm_forward(Elem* residual, Elem* out, float* mean, float* rstd, const Elem* x,
                                const Elem* y, const Elem* w, const Elem* b, int N, int C,
                                cudaStream_t stream);

// Scratch floats layernorm_backward needs (per-block partial dw/db).
size_t layernorm_backward_workspace_floats(int N, int C);

// dinp (N, C) +=; dw, db (C) += (fp32 partials per block, summed in block order: deterministic).
// Uses the forward's inp, mean and rstd. workspace: layernorm_backward_workspace_floats(N, C).
template <typename Elem>
void layernorm_backward(Elem* dinp, Elem* dw, Elem* db, const Elem* dout, const Elem* inp,
                        const Elem* w, const float* mean, const float* rstd, int N, int C,
                        float* workspace, cudaStream_t stream);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
