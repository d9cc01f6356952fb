// Rotary position embedding in Hugging Face's rotate-half convention, applied to the q and k
// parts of a packed qkv row; v is copied unchanged.
//
// qkv (B, T, (NH + 2 NKV) HD) holds per token [q (NH heads) | k (NKV heads) | v (NKV heads)],
// each head HD channels (HD even). For position t and i < HD/2, with the rotation frequencies
// inv_freq_i (by default 1 / theta^(2i / HD), fp32; a model's rope scaling may change them)
// and angle = t * inv_freq_i (an fp32 product, as Hugging Face computes it), each q and k head
// x becomes
//   out[i]        = x[i] cos(angle) - x[i + HD/2] sin(angle)
//   out[i + HD/2] = x[i + HD/2] cos(angle) + x[i] sin(angle).
#pragma once

namespace remat::cpu {

// inv_freq (HD/2) = 1 / theta^(2i / HD) in fp32 (powf), Hugging Face's default frequencies.
void rope_default_inv_freq(float* inv_freq, int HD, float theta);

// out (B, T, (NH + 2 NKV) HD) = rope(inp). out must not alias inp. inv_freq: HD/2 host values.
void rope_forward(float* out, const float* inp, int B, int T, int NH, int NKV, int HD,
                  const float* inv_freq);
// The default frequencies of theta.
void rope_forward(float* out, const float* inp, int B, int T, int NH, int NKV, int HD, float theta);

// dinp = rope^T(dout) (overwritten: the rotation by -angle on q and k, v copied). It needs
// no forward values. dinp must not alias dout.
void rope_backward(float* dinp, const float* dout, int B, int T, int NH, int NKV, int HD,
                   const float* inv_freq);
void rope_backward(float* dinp, const float* dout, int B, int T, int NH, int NKV, int HD,
                   float theta);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace remat::cuda {

// As the CPU's, fp32 math (angles as the CPU reference computes them). inv_freq: HD/2 values
// in host memory, copied into the launch (HD <= 512).
template <typename Elem>
void rope_forward(Elem* out, const Elem* inp, int B, int T, int NH, int NKV, int HD,
                  const float* inv_freq, cudaStream_t stream);
template <typename Elem>
void rope_backward(Elem* dinp, const Elem* dout, int B, int T, int NH, int NKV, int HD,
                   const float* inv_freq, cudaStream_t stream);
// The default frequencies of theta.
template <typename Elem>
void rope_forward(Elem* out, const Elem* inp, int B, int T, int NH, int NKV, int HD, float theta,
                  cudaStream_t stream);
template <typename Elem>
void rope_backward(Elem* dinp, const Elem* dout, int B, int T, int NH, int NKV, int HD, float theta,
                   cudaStream_t stream);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
