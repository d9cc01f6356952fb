// GeLU, GPT-2's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
#pragma once
#include <cstddef>

namespace remat::cpu {

// out (n) = gelu(inp). out may alias inp.
void gelu_forward(float* out, const float* inp, size_t n);

// dinp (n) = gelu'(inp) * dout (overwritten). dinp may alias dout.
void gelu_backward(float* dinp, const float* inp, const float* dout, size_t n);

}  // namespace remat::cpu
