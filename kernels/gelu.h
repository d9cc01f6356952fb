// GeLU, GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
#pragma once
#include <cstddef>

namespace remat::cpu {

// out (n) = gelu(inp). out may alias inp.
void gelu_forward(float* out, const float* inp, size_t n);

// dinp (n) = gelu'(inp) * dout (overwritten). dinp may alias dout.
void gelu_backward(float* dinp, const float* inp, const float* dout, size_t n);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace remat::cuda {

// out (n) = gelu(inp) (tanh form, fp32 math). out may alias inp.
template <typename Elem>
void gelu_forward(Elem* out, const Elem* inp, size_t n, cudaStream_t stream);

// dinp (n) = gelu'(inp) * dout (overwritten). dinp may alias dout.
template <typename Elem>
void gelu_backward(Elem* dinp, const Elem* inp, const Elem* dout, size_t n, cudaStream_t stream);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
