// AdamW with bias correction and decoupled weight decay; fp32 master weights and moments.
#pragma once
#include <cstddef>

namespace remat::cpu {

struct AdamWParams {
  float lr;            // learning rate of this step
  float beta1;         // first-moment decay (0.9)
  float beta2;         // second-moment decay (0.95 or 0.999)
  float eps;           // denominator epsilon (1e-8)
  float weight_decay;  // decoupled: param -= lr * wd * param
  int t;               // step number, 1-based, for bias correction
  float grad_scale;    // gradients are multiplied by this first (clipping), 1 = none
};

// params, m, v (n) updated in place from grads (n).
void adamw_update(float* params, float* m, float* v, const float* grads, size_t n,
                  const AdamWParams& p);

}  // namespace remat::cpu
