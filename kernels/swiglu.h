// SwiGLU, the Llama family's MLP activation: from one GEMM's output row [gate (I) | up (I)],
// out = silu(gate) * up with silu(g) = g / (1 + exp(-g)).
#pragma once

namespace remat::cpu {

// out (N, I) = silu(inp[:, :I]) * inp[:, I:]; inp (N, 2I).
void swiglu_forward(float* out, const float* inp, int N, int I);

// dinp (N, 2I) overwritten: d gate = dout * up * silu'(gate), d up = dout * silu(gate).
void swiglu_backward(float* dinp, const float* inp, const float* dout, int N, int I);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace remat::cuda {

// As the CPU's, fp32 math.
template <typename Elem>
void swiglu_forward(Elem* out, const Elem* inp, int N, int I, cudaStream_t stream);
template <typename Elem>
void swiglu_backward(Elem* dinp, const Elem* inp, const Elem* dout, int N, int I,
                     cudaStream_t stream);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
