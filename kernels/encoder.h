// Token + position embedding.
#pragma once

namespace remat::cpu {

// out (B, T, C) = wte[tokens[b, t]] + wpe[t] (wpe null: no position embedding). tokens must
// already be checked < V.
void encoder_forward(float* out, const int* tokens, const float* wte, const float* wpe, int B,
                     int T, int C);

// dwte (Vp, C) += scatter of dout by token; dwpe (maxT, C) += sum over b (dwpe null: none).
// Deterministic:
// each output channel is summed by one thread in token order.
void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* tokens, int B, int T,
                      int C);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace remat::cuda {

// out (B, T, C) = wte[tokens[b, t]] + wpe[t]; wpe may be null (no position embedding: out is
// the gather wte[tokens[b, t]]). tokens (B, T) int32, each < Vp (unchecked). C % 8 == 0.
template <typename Elem>
void encoder_forward(Elem* out, const int* tokens, const Elem* wte, const Elem* wpe, int B, int T,
                     int C, cudaStream_t stream);

// Bytes of scratch encoder_backward needs (the positions sorted by token): about
// 4 * (5 B T + Vp).
size_t encoder_backward_workspace_bytes(int B, int T, int Vp);

// dwte (Vp, C) += scatter of dout by token; dwpe (>= T, C) += sum over b; dwpe may be null
// (no position embedding: only dwte is written). Deterministic, and in the CPU reference's
// order: each dwte row adds its positions in increasing (b, t) order to its stored value in
// fp32, each dwpe entry adds b = 0, 1, ... likewise (fp32: bitwise equal to the CPU
// reference). Cost linear in B T whatever the tokens (a stable radix sort by token).
// workspace: encoder_backward_workspace_bytes(B, T, Vp) bytes, 16-byte aligned.
template <typename Elem>
void encoder_backward(Elem* dwte, Elem* dwpe, const Elem* dout, const int* tokens, int B, int T,
                      int C, int Vp, void* workspace, cudaStream_t stream);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
