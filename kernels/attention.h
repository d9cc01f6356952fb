// Causal multi-head self-attention in flash form: the forward keeps the output and the
// log-sum-exp of each query row, never the (T, T) matrix; the backward rebuilds the
// probabilities from q, k and the log-sum-exp.
//
// qkv (B, T, C + 2 NKV HD) holds per token [q (C) | k (NKV HD) | v (NKV HD)]: NH query heads
// of HD = C / NH channels and NKV key/value heads (grouped-query attention: query head h reads
// key/value head h / (NH / NKV); NH % NKV == 0). NKV = 0 means NH (GPT-2: qkv (B, T, 3C),
// llm.c's layout). Scale 1/sqrt(HD).
#pragma once

namespace remat::cpu {

// out (B, T, C) overwritten; lse (B, NH, T) overwritten.
void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH,
                       int NKV = 0);

// dqkv (B, T, C + 2 NKV HD) overwritten. Needs the forward's qkv, out and lse.
// Deterministic: parallel over (b, head) only; a key/value head's gradient sums its query
// heads in increasing order.
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int T, int C, int NH, int NKV = 0);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace remat::cuda {

// qkv (B, T, C + 2 NKV HD); out (B, T, C) overwritten; lse (B, NH, T) fp32 overwritten
// (natural log, of the scaled scores). bf16 with HD = C / NH in {64, 128}: flash attention on
// mma.sync tensor cores (bf16 inputs, fp32 accumulation, P rounded to bf16 for the P V
// product). Other cases (fp32, other head dims <= 256): a plain fp32 kernel (exact-comparison
// mode).
template <typename Elem>
void attention_forward(Elem* out, float* lse, const Elem* qkv, int B, int T, int C, int NH,
                       cudaStream_t stream, int NKV = 0);

// Scratch floats attention_backward needs: D = rowsum(dout * out), (B, NH, T).
size_t attention_backward_workspace_floats(int B, int T, int NH);

// dqkv (B, T, C + 2 NKV HD) overwritten. Needs the forward's qkv, out and lse. Deterministic,
// no float atomics: dK and dV are accumulated per key block of a key/value head by one CTA,
// which walks its group's query heads in increasing order; dQ by a separate pass per query
// block (P is rebuilt in both passes).
template <typename Elem>
void attention_backward(Elem* dqkv, const Elem* dout, const Elem* qkv, const Elem* out,
                        const float* lse, int B, int T, int C, int NH, float* workspace,
                        cudaStream_t stream, int NKV = 0);

// Scratch floats attention_backward_fused needs (>= attention_backward_workspace_floats):
// D, a (B, NH, T, HD) fp32 dQ accumulator and the ordering semaphores.
size_t attention_backward_fused_workspace_floats(int B, int T, int C, int NH);

// UNVERIFIED on a GPU (written without one; attention_backward stays the default until a GPU
// run of tests/gpu/test_attention_bwd_gpu.cu passes). Same contract as attention_backward,
// workspace sized by attention_backward_fused_workspace_floats and 16-byte aligned. bf16 with
// HD in {64, 128}: one pass for dK, dV and dQ (5 GEMM-equivalents against the two-pass 7).
// Deterministic, no float atomics: dK and dV as in attention_backward (the same code, so the
// same bits); each query block's dQ is summed over key blocks in a fixed (descending) order
// that per-block semaphores in the workspace enforce. Other cases run attention_backward.
template <typename Elem>
void attention_backward_fused(Elem* dqkv, const Elem* dout, const Elem* qkv, const Elem* out,
                              const float* lse, int B, int T, int C, int NH, float* workspace,
                              cudaStream_t stream, int NKV = 0);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
