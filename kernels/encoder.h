// Token + position embedding.
#pragma once

namespace remat::cpu {

// out (B, T, C) = wte[tokens[b, t]] + wpe[t]. tokens must already be checked < V.
void encoder_forward(float* out, const int* tokens, const float* wte, const float* wpe, int B,
                     int T, int C);

// dwte (Vp, C) += scatter of dout by token; dwpe (maxT, C) += sum over b. Deterministic:
// each output channel is summed by one thread in token order.
void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* tokens, int B, int T,
                      int C);

}  // namespace remat::cpu
