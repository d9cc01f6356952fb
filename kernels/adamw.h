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

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace remat::cuda {

// master, m, v (n) fp32 updated in place from grads (n) with the CPU formula. params (n),
// when not null, receives the updated master rounded to Elem (the bf16 weights the forward
// reads). grad_scale_dev, when not null, is a device scalar multiplied into p.grad_scale
// (the clip factor from clip_scale(), read without a host round trip).
template <typename Elem>
void adamw_update(float* master, float* m, float* v, const Elem* grads, Elem* params, size_t n,
                  const cpu::AdamWParams& p, const float* grad_scale_dev, cudaStream_t stream);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
