// GeLU (tanh form) forward and backward: element-wise, 16-byte vector accesses.
#include "kernels/cuda_common.cuh"
#include "kernels/gelu.h"

namespace remat::cuda {
namespace {

enum class Dir { kForward, kBackward };

template <typename T>
struct GeluParams {
  T* out;         // (n) forward: gelu(inp); backward: dinp. May alias inp or dout.
  const T* inp;   // (n) the GeLU input
  const T* dout;  // (n) backward only: gradient of the GeLU output
  size_t n;       // element count
  bool vec;       // all pointers 16-byte aligned: whole packs by vector access
};

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

__device__ __forceinline__ float gelu_f(float x) {
  const float u = kSqrt2OverPi * (x + kCubic * x * x * x);
  return 0.5f * x * (1.f + tanhf(u));
}

// d gelu / dx.
__device__ __forceinline__ float gelu_grad_f(float x) {
  const float u = kSqrt2OverPi * (x + kCubic * x * x * x);
  const float th = tanhf(u);
  const float sech2 = 1.f - th * th;
  return 0.5f * (1.f + th) + 0.5f * x * sech2 * kSqrt2OverPi * (1.f + 3.f * kCubic * x * x);
}

template <Dir kDir, typename T>
__device__ __forceinline__ float apply(const T* inp, const T* dout, size_t i) {
  const float x = to_f32(inp[i]);
  if constexpr (kDir == Dir::kForward) {
    return gelu_f(x);
  } else {
    return gelu_grad_f(x) * to_f32(dout[i]);
  }
}

// Grid-stride over packs of Pack16<T>::kN elements, then a scalar tail (or all scalar when
// !p.vec). Each element is read before its (possibly aliased) output is written by the
// same thread.
template <Dir kDir, typename T>
__global__ void gelu_kernel(const __grid_constant__ GeluParams<T> p) {
  using P = Pack16<T>;
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  const size_t tid = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const size_t npacks = p.vec ? p.n / P::kN : 0;
  for (size_t k = tid; k < npacks; k += stride) {
    const P x = P::load(p.inp + k * P::kN);
    P g;
    if constexpr (kDir == Dir::kBackward) g = P::load(p.dout + k * P::kN);
    P y;
#pragma unroll
    for (int j = 0; j < P::kN; ++j) {
      const float xf = to_f32(x.v[j]);
      float r;
      if constexpr (kDir == Dir::kForward) {
        r = gelu_f(xf);
      } else {
        r = gelu_grad_f(xf) * to_f32(g.v[j]);
      }
      y.v[j] = from_f32<T>(r);
    }
    y.store(p.out + k * P::kN);
  }
  for (size_t i = npacks * P::kN + tid; i < p.n; i += stride)
    p.out[i] = from_f32<T>(apply<kDir>(p.inp, p.dout, i));
}

template <Dir kDir, typename T>
void launch(T* out, const T* inp, const T* dout, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  GeluParams<T> p{out, inp, dout, n,
                  aligned16(out) && aligned16(inp) && (dout == nullptr || aligned16(dout))};
  constexpr int kThreads = 256;
  const size_t units = p.vec ? (n + Pack16<T>::kN - 1) / Pack16<T>::kN : n;
  const long max_blocks = static_cast<long>(device_props().multiProcessorCount) * 16;
  const int blocks = static_cast<int>(std::min<long>(ceil_div(units, kThreads), max_blocks));
  gelu_kernel<kDir, T><<<blocks, kThreads, 0, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

}  // namespace

template <typename Elem>
void gelu_forward(Elem* out, const Elem* inp, size_t n, cudaStream_t stream) {
  REMAT_CHECK(n == 0 || (out != nullptr && inp != nullptr), "gelu_forward: null pointer");
  NvtxRange range("gelu_forward");
  launch<Dir::kForward>(out, inp, static_cast<const Elem*>(nullptr), n, stream);
}

template <typename Elem>
void gelu_backward(Elem* dinp, const Elem* inp, const Elem* dout, size_t n, cudaStream_t stream) {
  REMAT_CHECK(n == 0 || (dinp != nullptr && inp != nullptr && dout != nullptr),
              "gelu_backward: null pointer");
  NvtxRange range("gelu_backward");
  launch<Dir::kBackward>(dinp, inp, dout, n, stream);
}

template void gelu_forward<float>(float*, const float*, size_t, cudaStream_t);
template void gelu_forward<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*, size_t,
                                          cudaStream_t);
template void gelu_backward<float>(float*, const float*, const float*, size_t, cudaStream_t);
template void gelu_backward<__nv_bfloat16>(__nv_bfloat16*, const __nv_bfloat16*,
                                           const __nv_bfloat16*, size_t, cudaStream_t);

}  // namespace remat::cuda
