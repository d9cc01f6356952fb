// SwiGLU on the CPU: each output element reads its row's gate and up columns only, so any
// split over rows is deterministic. fp32 math with expf.
#include "kernels/swiglu.h"

#include <cmath>
#include <string>

#include "kernels/common.h"

namespace remat::cpu {
namespace {

void check_shape(const char* who, int N, int I) {
  REMAT_CHECK(N >= 0 && I > 0,
              std::string(who) + ": bad shape N=" + std::to_string(N) + " I=" + std::to_string(I));
}

}  // namespace

void swiglu_forward(float* out, const float* inp, int N, int I) {
  check_shape("swiglu_forward", N, I);
  REMAT_CHECK(N == 0 || (out && inp), "swiglu_forward: null pointer");
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* gate = inp + 2L * I * n;
    const float* up = gate + I;
    float* y = out + static_cast<long>(I) * n;
    for (int i = 0; i < I; ++i) {
      const float g = gate[i];
      y[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  }
}

void swiglu_backward(float* dinp, const float* inp, const float* dout, int N, int I) {
  check_shape("swiglu_backward", N, I);
  REMAT_CHECK(N == 0 || (dinp && inp && dout), "swiglu_backward: null pointer");
  // silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const float* gate = inp + 2L * I * n;
    const float* up = gate + I;
    const float* dy = dout + static_cast<long>(I) * n;
    float* dgate = dinp + 2L * I * n;
    float* dup = dgate + I;
    for (int i = 0; i < I; ++i) {
      const float g = gate[i], u = up[i], d = dy[i];
      const float s = 1.0f / (1.0f + std::exp(-g));
      dgate[i] = d * u * s * (1.0f + g * (1.0f - s));
      dup[i] = d * g * s;
    }
  }
}

}  // namespace remat::cpu
