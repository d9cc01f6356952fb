// SwiGLU forward and backward: elementwise over rows [gate (I) | up (I)], fp32 math.
//
// One thread per kV consecutive columns of a row (grid-stride): kV = 16 bytes of elements
// when I % kV == 0 and every pointer is 16-byte aligned (each access one vector), else 1.
#include "kernels/cuda_common.cuh"
#include "kernels/swiglu.h"

namespace remat::cuda {
namespace {

template <typename T>
struct SwigluParams {
  T* dst;         // forward: out (N, I); backward: dinp (N, 2I); overwritten
  const T* inp;   // (N, 2I) per row [gate | up]
  const T* dout;  // backward: (N, I) gradient of out; forward: null
  int N;          // rows
  int I;          // intermediate width
};

// kV consecutive elements: one 16-byte vector when kV fills 16 bytes, else scalars.
template <typename T, int kV>
struct alignas(kV == Pack16<T>::kN ? 16 : alignof(T)) Cols {
  T v[kV];
  __device__ __forceinline__ static Cols load(const T* p) {
    Cols r;
    if constexpr (kV == Pack16<T>::kN) {
      *reinterpret_cast<int4*>(&r) = *reinterpret_cast<const int4*>(p);
    } else {
#pragma unroll
      for (int j = 0; j < kV; ++j) r.v[j] = p[j];
    }
    return r;
  }
  __device__ __forceinline__ void store(T* p) const {
    if constexpr (kV == Pack16<T>::kN) {
      *reinterpret_cast<int4*>(p) = *reinterpret_cast<const int4*>(this);
    } else {
#pragma unroll
      for (int j = 0; j < kV; ++j) p[j] = v[j];
    }
  }
};

// out = silu(g) * u, silu(g) = g / (1 + exp(-g)).
template <typename T, int kV>
__global__ void swiglu_forward_kernel(const __grid_constant__ SwigluParams<T> p) {
  const long per_row = p.I / kV, total = static_cast<long>(p.N) * per_row;
  for (long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<long>(gridDim.x) * blockDim.x) {
    const long n = idx / per_row;
    const int c = static_cast<int>(idx % per_row) * kV;
    const T* row = p.inp + n * 2 * p.I;
    const Cols<T, kV> g = Cols<T, kV>::load(row + c), u = Cols<T, kV>::load(row + p.I + c);
    Cols<T, kV> o;
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const float x = to_f32(g.v[j]);
      o.v[j] = from_f32<T>(x / (1.f + expf(-x)) * to_f32(u.v[j]));
    }
    o.store(p.dst + n * p.I + c);
  }
}

// With s = sigmoid(g): d gate = dout * up * s (1 + g (1 - s)), d up = dout * g * s
// (the CPU reference's order of operations).
template <typename T, int kV>
__global__ void swiglu_backward_kernel(const __grid_constant__ SwigluParams<T> p) {
  const long per_row = p.I / kV, total = static_cast<long>(p.N) * per_row;
  for (long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<long>(gridDim.x) * blockDim.x) {
    const long n = idx / per_row;
    const int c = static_cast<int>(idx % per_row) * kV;
    const T* row = p.inp + n * 2 * p.I;
    const Cols<T, kV> g = Cols<T, kV>::load(row + c), u = Cols<T, kV>::load(row + p.I + c);
    const Cols<T, kV> dy = Cols<T, kV>::load(p.dout + n * p.I + c);
    Cols<T, kV> dg, du;
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const float x = to_f32(g.v[j]), up = to_f32(u.v[j]), d = to_f32(dy.v[j]);
      const float s = 1.f / (1.f + expf(-x));
      dg.v[j] = from_f32<T>(d * up * s * (1.f + x * (1.f - s)));
      du.v[j] = from_f32<T>(d * x * s);
    }
    T* drow = p.dst + n * 2 * p.I;
    dg.store(drow + c);
    du.store(drow + p.I + c);
  }
}

void check_shape(const char* who, int N, int I) {
  REMAT_CHECK(N >= 0 && I > 0, std::string(who) + ": need N >= 0 and I > 0, got N=" +
                                   std::to_string(N) + " I=" + std::to_string(I));
}

template <typename T, int kV>
int grid_for(const SwigluParams<T>& p) {
  const long work = static_cast<long>(p.N) * (p.I / kV);
  return static_cast<int>(
      std::min<long>(ceil_div(work, 256), device_props().multiProcessorCount * 16L));
}

}  // namespace

template <typename Elem>
void swiglu_forward(Elem* out, const Elem* inp, int N, int I, cudaStream_t stream) {
  check_shape("swiglu_forward", N, I);
  if (N == 0) return;
  REMAT_CHECK(out && inp, "swiglu_forward: null pointer");
  NvtxRange range("swiglu_forward");
  const SwigluParams<Elem> p{out, inp, nullptr, N, I};
  constexpr int kN = Pack16<Elem>::kN;
  if (I % kN == 0 && aligned16(out) && aligned16(inp)) {
    swiglu_forward_kernel<Elem, kN><<<grid_for<Elem, kN>(p), 256, 0, stream>>>(p);
  } else {
    swiglu_forward_kernel<Elem, 1><<<grid_for<Elem, 1>(p), 256, 0, stream>>>(p);
  }
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

template <typename Elem>
void swiglu_backward(Elem* dinp, const Elem* inp, const Elem* dout, int N, int I,
                     cudaStream_t stream) {
  check_shape("swiglu_backward", N, I);
  if (N == 0) return;
  REMAT_CHECK(dinp && inp && dout, "swiglu_backward: null pointer");
  NvtxRange range("swiglu_backward");
  const SwigluParams<Elem> p{dinp, inp, dout, N, I};
  constexpr int kN = Pack16<Elem>::kN;
  if (I % kN == 0 && aligned16(dinp) && aligned16(inp) && aligned16(dout)) {
    swiglu_backward_kernel<Elem, kN><<<grid_for<Elem, kN>(p), 256, 0, stream>>>(p);
  } else {
    swiglu_backward_kernel<Elem, 1><<<grid_for<Elem, 1>(p), 256, 0, stream>>>(p);
  }
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

#define REMAT_INSTANTIATE(E)                                             \
  template void swiglu_forward<E>(E*, const E*, int, int, cudaStream_t); \
  template void swiglu_backward<E>(E*, const E*, const E*, int, int, cudaStream_t);
REMAT_INSTANTIATE(float)
REMAT_INSTANTIATE(__nv_bfloat16)
#undef REMAT_INSTANTIATE

}  // namespace remat::cuda
