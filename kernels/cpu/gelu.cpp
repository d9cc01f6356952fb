// GeLU (tanh approximation) on the CPU: elementwise, so any split of the range is deterministic.
#include "kernels/gelu.h"

#include <cmath>

#include "kernels/common.h"

namespace remat::cpu {
namespace {

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

}  // namespace

void gelu_forward(float* out, const float* inp, size_t n) {
  REMAT_CHECK(n == 0 || (out && inp), "gelu_forward: null pointer");
  const long count = static_cast<long>(n);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < count; ++i) {
    const float x = inp[i];
    const float u = kSqrt2OverPi * (x + kCubic * x * x * x);
    out[i] = 0.5f * x * (1.0f + std::tanh(u));
  }
}

void gelu_backward(float* dinp, const float* inp, const float* dout, size_t n) {
  REMAT_CHECK(n == 0 || (dinp && inp && dout), "gelu_backward: null pointer");
  const long count = static_cast<long>(n);
  // d/dx [0.5 x (1 + tanh u)] = 0.5 (1 + tanh u) + 0.5 x sech^2(u) du/dx,
  // du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).
#pragma omp parallel for schedule(static)
  for (long i = 0; i < count; ++i) {
    const float x = inp[i];
    const float u = kSqrt2OverPi * (x + kCubic * x * x * x);
    const float th = std::tanh(u);
    const float sech2 = 1.0f - th * th;
    const float grad =
        0.5f * (1.0f + th) + 0.5f * x * sech2 * kSqrt2OverPi * (1.0f + 3.0f * kCubic * x * x);
    dinp[i] = grad * dout[i];
  }
}

}  // namespace remat::cpu
