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
