// Linear layer: out = inp @ w^T + bias, weights stored (OC, C) as in llm.c / GPT-2.
#pragma once

namespace remat::cpu {

// out (N, OC) = inp (N, C) @ w (OC, C)^T + bias (OC). bias may be null. out is overwritten.
void matmul_forward(float* out, const float* inp, const float* w, const float* bias, int N, int C,
                    int OC);

// dinp (N, C)  = dout (N, OC) @ w (OC, C)       (overwritten; skipped when dinp is null)
// dw   (OC, C) += dout^T @ inp                   (accumulated)
// dbias (OC)  += sum over rows of dout           (accumulated; skipped when null)
void matmul_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                     const float* w, int N, int C, int OC);

}  // namespace remat::cpu
