// Causal multi-head self-attention in flash form: the forward keeps the output and the
// log-sum-exp of each query row, never the (T, T) matrix; the backward rebuilds the
// probabilities from q, k and the log-sum-exp.
//
// qkv (B, T, 3C) holds per token [q (C) | k (C) | v (C)], each split into NH heads of
// HD = C / NH channels (llm.c's layout). Scale 1/sqrt(HD).
#pragma once

namespace remat::cpu {

// out (B, T, C) overwritten; lse (B, NH, T) overwritten.
void attention_forward(float* out, float* lse, const float* qkv, int B, int T, int C, int NH);

// dqkv (B, T, 3C) overwritten. Needs the forward's qkv, out and lse.
// Deterministic: parallel over (b, head) only.
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out,
                        const float* lse, int B, int T, int C, int NH);

}  // namespace remat::cpu
