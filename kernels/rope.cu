// Rotary position embedding (rotate-half) on packed qkv rows, forward and backward.
//
// One thread per (token, chunk of kV pair indices i < HD / 2): it forms its kV angles once and
// rotates the pairs (i, i + HD/2) of every q and k head of the token, then copies the same
// channels of each v head. kV = 16 bytes of elements when HD / 2 allows it (every access one
// 16-byte vector), else 1.
//
// Angles as the CPU reference forms them: inv_freq_i = 1 / theta^(2i / HD) is computed on the
// host in fp32 (the same powf), angle = (float)t * inv_freq_i is one fp32 product on both sides
// (identical bits); cos and sin are full-precision sincosf (the CPU rounds double cos/sin of the
// same angle, so the two differ by about an fp32 ulp).
#include <cmath>
#include <string>
#include <vector>

#include "kernels/cuda_common.cuh"
#include "kernels/rope.h"

namespace remat::cuda {
namespace {

constexpr int kMaxHalf = 256;  // HD <= 512: inv_freq travels in the launch parameters

template <typename E>
struct RopeParams {
  E* out;                    // (N, W) overwritten, W = (NQK + NKV) HD
  const E* inp;              // (N, W) per token [q (NH heads) | k (NKV) | v (NKV)]
  int N;                     // tokens, B * T
  int T;                     // sequence length: position = token % T
  int NQK;                   // rotated heads per token, NH + NKV
  int NKV;                   // copied (v) heads per token
  int HD;                    // head dim, even
  int chunks;                // HD / 2 / kV: threads per token
  float sign;                // +1 forward (rotate by angle), -1 backward (by -angle)
  float inv_freq[kMaxHalf];  // (HD / 2) 1 / theta^(2i / HD)
};

// kV consecutive elements: one 16-byte vector when kV fills 16 bytes, else scalars.
template <typename E, int kV>
struct alignas(kV == Pack16<E>::kN ? 16 : alignof(E)) Chunk {
  E v[kV];
  __device__ __forceinline__ static Chunk load(const E* p) {
    Chunk r;
    if constexpr (kV == Pack16<E>::kN) {
      *reinterpret_cast<int4*>(&r) = *reinterpret_cast<const int4*>(p);
    } else {
#pragma unroll
      for (int j = 0; j < kV; ++j) r.v[j] = p[j];
    }
    return r;
  }
  __device__ __forceinline__ void store(E* p) const {
    if constexpr (kV == Pack16<E>::kN) {
      *reinterpret_cast<int4*>(p) = *reinterpret_cast<const int4*>(this);
    } else {
#pragma unroll
      for (int j = 0; j < kV; ++j) p[j] = v[j];
    }
  }
};

// Grid: ceil(N * chunks / 256) blocks of 256 threads.
template <typename E, int kV>
__global__ void rope_kernel(const __grid_constant__ RopeParams<E> p) {
  const long idx = static_cast<long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<long>(p.N) * p.chunks) return;
  const int n = static_cast<int>(idx / p.chunks);
  const int i0 = static_cast<int>(idx % p.chunks) * kV;  // first pair index of this chunk
  const int half = p.HD / 2;
  const float pos = static_cast<float>(n % p.T);
  float cs[kV], sn[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) {
    sincosf(pos * p.inv_freq[i0 + j], &sn[j], &cs[j]);
    sn[j] *= p.sign;
  }
  const size_t row = static_cast<size_t>(n) * (p.NQK + p.NKV) * p.HD;
  for (int hh = 0; hh < p.NQK; ++hh) {
    const size_t o = row + static_cast<size_t>(hh) * p.HD + i0;
    const Chunk<E, kV> x1 = Chunk<E, kV>::load(p.inp + o);         // channels i0 ..
    const Chunk<E, kV> x2 = Chunk<E, kV>::load(p.inp + o + half);  // channels i0 + HD/2 ..
    Chunk<E, kV> y1, y2;
#pragma unroll
    for (int j = 0; j < kV; ++j) {
      const float a = to_f32(x1.v[j]), b = to_f32(x2.v[j]);
      y1.v[j] = from_f32<E>(a * cs[j] - b * sn[j]);
      y2.v[j] = from_f32<E>(b * cs[j] + a * sn[j]);
    }
    y1.store(p.out + o);
    y2.store(p.out + o + half);
  }
  for (int hv = 0; hv < p.NKV; ++hv) {
    const size_t o = row + static_cast<size_t>(p.NQK + hv) * p.HD + i0;
    Chunk<E, kV>::load(p.inp + o).store(p.out + o);
    Chunk<E, kV>::load(p.inp + o + half).store(p.out + o + half);
  }
}

template <typename E>
void rope_impl(const char* who, E* out, const E* inp, int B, int T_, int NH, int NKV, int HD,
               const float* inv_freq, float sign, cudaStream_t stream) {
  REMAT_CHECK(B >= 0 && T_ >= 0 && NH > 0 && NKV > 0 && HD > 0 && HD % 2 == 0 &&
                  HD / 2 <= kMaxHalf && inv_freq,
              std::string(who) + ": need B, T >= 0, NH, NKV > 0, even 0 < HD <= " +
                  std::to_string(2 * kMaxHalf) + ", frequencies; got B=" + std::to_string(B) +
                  " T=" + std::to_string(T_) + " NH=" + std::to_string(NH) +
                  " NKV=" + std::to_string(NKV) + " HD=" + std::to_string(HD));
  const long N = static_cast<long>(B) * T_;
  REMAT_CHECK(N <= INT32_MAX, std::string(who) + ": too many tokens");
  if (N == 0) return;
  REMAT_CHECK(out && inp, std::string(who) + ": null pointer");
  NvtxRange range(who);
  RopeParams<E> p{};
  p.out = out;
  p.inp = inp;
  p.N = static_cast<int>(N);
  p.T = T_;
  p.NQK = NH + NKV;
  p.NKV = NKV;
  p.HD = HD;
  p.sign = sign;
  const int half = HD / 2;
  for (int i = 0; i < half; ++i) p.inv_freq[i] = inv_freq[i];
  constexpr int kN = Pack16<E>::kN;
  if (half % kN == 0 && aligned16(out) && aligned16(inp)) {
    p.chunks = half / kN;
    rope_kernel<E, kN><<<ceil_div(N * p.chunks, 256), 256, 0, stream>>>(p);
  } else {
    p.chunks = half;
    rope_kernel<E, 1><<<ceil_div(N * p.chunks, 256), 256, 0, stream>>>(p);
  }
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

}  // namespace

// The default frequencies, as the CPU reference forms them (the same powf on the host).
static std::vector<float> default_inv_freq(int HD, float theta) {
  REMAT_CHECK(theta > 0.f && HD > 0 && HD % 2 == 0,
              "rope: theta must be positive and HD even, got theta=" + std::to_string(theta) +
                  " HD=" + std::to_string(HD));
  std::vector<float> f(HD / 2);
  for (int i = 0; i < HD / 2; ++i)
    f[i] = 1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(HD));
  return f;
}

template <typename Elem>
void rope_forward(Elem* out, const Elem* inp, int B, int T, int NH, int NKV, int HD,
                  const float* inv_freq, cudaStream_t stream) {
  rope_impl<Elem>("rope_forward", out, inp, B, T, NH, NKV, HD, inv_freq, 1.f, stream);
}

template <typename Elem>
void rope_backward(Elem* dinp, const Elem* dout, int B, int T, int NH, int NKV, int HD,
                   const float* inv_freq, cudaStream_t stream) {
  rope_impl<Elem>("rope_backward", dinp, dout, B, T, NH, NKV, HD, inv_freq, -1.f, stream);
}

template <typename Elem>
void rope_forward(Elem* out, const Elem* inp, int B, int T, int NH, int NKV, int HD, float theta,
                  cudaStream_t stream) {
  const std::vector<float> f = default_inv_freq(HD, theta);
  rope_forward(out, inp, B, T, NH, NKV, HD, f.data(), stream);
}

template <typename Elem>
void rope_backward(Elem* dinp, const Elem* dout, int B, int T, int NH, int NKV, int HD, float theta,
                   cudaStream_t stream) {
  const std::vector<float> f = default_inv_freq(HD, theta);
  rope_backward(dinp, dout, B, T, NH, NKV, HD, f.data(), stream);
}

#define REMAT_INSTANTIATE(E)                                                                 \
  template void rope_forward<E>(E*, const E*, int, int, int, int, int, const float*,         \
                                cudaStream_t);                                               \
  template void rope_backward<E>(E*, const E*, int, int, int, int, int, const float*,        \
                                 cudaStream_t);                                              \
  template void rope_forward<E>(E*, const E*, int, int, int, int, int, float, cudaStream_t); \
  template void rope_backward<E>(E*, const E*, int, int, int, int, int, float, cudaStream_t);
REMAT_INSTANTIATE(float)
REMAT_INSTANTIATE(__nv_bfloat16)
#undef REMAT_INSTANTIATE

}  // namespace remat::cuda
