// AdamW on the CPU, elementwise in float. The update is PyTorch's AdamW (decoupled decay, bias
// correction) in exact arithmetic; the float rounding follows llm.c's ordering. For each i,
// with g = grads[i] * grad_scale:
//   m     = beta1 * m + (1 - beta1) * g
//   v     = beta2 * v + (1 - beta2) * g * g
//   m_hat = m / (1 - beta1^t),  v_hat = v / (1 - beta2^t)    (corrections formed in double,
//                                                              then rounded to float)
//   param = param - lr * (m_hat / (sqrt(v_hat) + eps) + weight_decay * param)
// The decay uses the parameter before this step's update (decoupled weight decay).
#include "kernels/adamw.h"

#include <cmath>

#include "kernels/common.h"

namespace remat::cpu {

void adamw_update(float* params, float* m, float* v, const float* grads, size_t n,
                  const AdamWParams& p) {
  REMAT_CHECK(p.t >= 1, "adamw_update: step t must be >= 1, got " + std::to_string(p.t));
  REMAT_CHECK(n == 0 || (params && m && v && grads), "adamw_update: null pointer");
  const float bias1 = static_cast<float>(1.0 - std::pow(static_cast<double>(p.beta1), p.t));
  const float bias2 = static_cast<float>(1.0 - std::pow(static_cast<double>(p.beta2), p.t));
  const float one_minus_b1 = 1.0f - p.beta1;
  const float one_minus_b2 = 1.0f - p.beta2;
  const long count = static_cast<long>(n);
#pragma omp parallel for schedule(static)
  for (long i = 0; i < count; ++i) {
    const float g = grads[i] * p.grad_scale;
    const float mi = p.beta1 * m[i] + one_minus_b1 * g;
    const float vi = p.beta2 * v[i] + one_minus_b2 * g * g;
    m[i] = mi;
    v[i] = vi;
    const float m_hat = mi / bias1;
    const float v_hat = vi / bias2;
    const float param = params[i];
    params[i] = param - p.lr * (m_hat / (std::sqrt(v_hat) + p.eps) + p.weight_decay * param);
  }
}

}  // namespace remat::cpu
