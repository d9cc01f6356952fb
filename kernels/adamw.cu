// AdamW on fp32 master weights and moments, reading Elem gradients and writing an Elem copy
// of the weights. Same formula and rounding order as kernels/cpu/adamw.cpp (the device may
// contract a multiply-add into an FMA, as the host compiler may).
#include <cmath>

#include "kernels/adamw.h"
#include "kernels/cuda_common.cuh"

namespace remat::cuda {
namespace {

template <typename T>
struct AdamWKernelParams {
  float* master;                              // (n) fp32 weights, updated in place
  float* m;                                   // (n) first moment, updated in place
  float* v;                                   // (n) second moment, updated in place
  const T* grads;                             // (n) gradients
  T* params;                                  // (n) updated weights rounded to T, or null
  size_t n;                                   // element count
  float lr, beta1, beta2, eps, weight_decay;  // as cpu::AdamWParams
  float bias1, bias2;           // 1 - beta^t, formed in double on the host, rounded to float
  float grad_scale;             // host factor
  const float* grad_scale_dev;  // device factor, or null
  bool vec;                     // every pointer 16-byte aligned (8 for bf16 arrays)
};

// Four consecutive elements of T, moved with one 16-byte (fp32) or 8-byte (bf16) access.
template <typename T>
struct alignas(4 * sizeof(T)) QuadA {
  T v[4];
};

template <typename T>
__device__ __forceinline__ void update(const AdamWKernelParams<T>& p, float scale, float& w,
                                       float& m, float& v, float grad) {
  const float g = grad * scale;
  m = p.beta1 * m + (1.0f - p.beta1) * g;
  v = p.beta2 * v + (1.0f - p.beta2) * g * g;
  const float m_hat = m / p.bias1;
  const float v_hat = v / p.bias2;
  w = w - p.lr * (m_hat / (sqrtf(v_hat) + p.eps) + p.weight_decay * w);
}

// Grid-stride over quads of 4 elements (vector loads), then a scalar tail.
template <typename T>
__global__ void adamw_kernel(const __grid_constant__ AdamWKernelParams<T> p) {
  const float scale = p.grad_scale * (p.grad_scale_dev ? *p.grad_scale_dev : 1.0f);
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t nquads = p.vec ? p.n / 4 : 0;
  for (size_t q = tid; q < nquads; q += stride) {
    float4 w = reinterpret_cast<const float4*>(p.master)[q];
    float4 m = reinterpret_cast<const float4*>(p.m)[q];
    float4 v = reinterpret_cast<const float4*>(p.v)[q];
    const QuadA<T> g = reinterpret_cast<const QuadA<T>*>(p.grads)[q];
    update(p, scale, w.x, m.x, v.x, to_f32(g.v[0]));
    update(p, scale, w.y, m.y, v.y, to_f32(g.v[1]));
    update(p, scale, w.z, m.z, v.z, to_f32(g.v[2]));
    update(p, scale, w.w, m.w, v.w, to_f32(g.v[3]));
    reinterpret_cast<float4*>(p.master)[q] = w;
    reinterpret_cast<float4*>(p.m)[q] = m;
    reinterpret_cast<float4*>(p.v)[q] = v;
    if (p.params) {
      QuadA<T> o;
      o.v[0] = from_f32<T>(w.x);
      o.v[1] = from_f32<T>(w.y);
      o.v[2] = from_f32<T>(w.z);
      o.v[3] = from_f32<T>(w.w);
      reinterpret_cast<QuadA<T>*>(p.params)[q] = o;
    }
  }
  for (size_t i = nquads * 4 + tid; i < p.n; i += stride) {
    float w = p.master[i], m = p.m[i], v = p.v[i];
    update(p, scale, w, m, v, to_f32(p.grads[i]));
    p.master[i] = w;
    p.m[i] = m;
    p.v[i] = v;
    if (p.params) p.params[i] = from_f32<T>(w);
  }
}

}  // namespace

template <typename Elem>
void adamw_update(float* master, float* m, float* v, const Elem* grads, Elem* params, size_t n,
                  const cpu::AdamWParams& hp, const float* grad_scale_dev, cudaStream_t stream) {
  REMAT_CHECK(hp.t >= 1, "adamw_update: step t must be >= 1, got " + std::to_string(hp.t));
  if (n == 0) return;
  REMAT_CHECK(master && m && v && grads, "adamw_update: null pointer");
  NvtxRange range("adamw_update");
  AdamWKernelParams<Elem> p;
  p.master = master;
  p.m = m;
  p.v = v;
  p.grads = grads;
  p.params = params;
  p.n = n;
  p.lr = hp.lr;
  p.beta1 = hp.beta1;
  p.beta2 = hp.beta2;
  p.eps = hp.eps;
  p.weight_decay = hp.weight_decay;
  p.bias1 = static_cast<float>(1.0 - std::pow(static_cast<double>(hp.beta1), hp.t));
  p.bias2 = static_cast<float>(1.0 - std::pow(static_cast<double>(hp.beta2), hp.t));
  p.grad_scale = hp.grad_scale;
  p.grad_scale_dev = grad_scale_dev;
  const auto a = [](const void* q, unsigned bytes) {
    return (reinterpret_cast<uintptr_t>(q) % bytes) == 0;
  };
  p.vec = aligned16(master) && aligned16(m) && aligned16(v) && a(grads, 4 * sizeof(Elem)) &&
          (params == nullptr || a(params, 4 * sizeof(Elem)));
  constexpr int kThreads = 256;
  const size_t units = p.vec ? (n + 3) / 4 : n;
  const int blocks = static_cast<int>(std::min<long>(ceil_div(static_cast<long>(units), kThreads),
                                                     device_props().multiProcessorCount * 16L));
  adamw_kernel<Elem><<<blocks, kThreads, 0, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

template void adamw_update<float>(float*, float*, float*, const float*, float*, size_t,
                                  const cpu::AdamWParams&, const float*, cudaStream_t);
template void adamw_update<__nv_bfloat16>(float*, float*, float*, const __nv_bfloat16*,
                                          __nv_bfloat16*, size_t, const cpu::AdamWParams&,
                                          const float*, cudaStream_t);

}  // namespace remat::cuda
