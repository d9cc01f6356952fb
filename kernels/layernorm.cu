// LayerNorm (plain and fused with the residual add) forward, and backward with a
// deterministic dw/db reduction. One warp per row; the row is staged in shared memory as
// fp32, each lane touching only the channels it loaded (no intra-warp barrier needed).
#include "kernels/cuda_common.cuh"
#include "kernels/layernorm.h"

namespace remat::cuda {
namespace {

constexpr float kEps = 1e-5f;
constexpr int kMaxC = 16384;        // smem row staging limit (see launch checks)
constexpr int kBwdMaxBlocks = 256;  // fixed grid of the backward: partials per block
constexpr size_t kDefaultSmem = 48 * 1024;

template <typename T>
struct LnFwdParams {
  T* out;        // (N, C) normalized output, overwritten
  float* mean;   // (N) row means, or null
  float* rstd;   // (N) row 1/std, or null
  T* residual;   // (N, C) = inp + y (rounded to T) when y is set; else unused
  const T* inp;  // (N, C) LayerNorm input (first residual addend when y is set)
  const T* y;    // (N, C) second residual addend, or null (plain LayerNorm)
  const T* w;    // (C) gain
  const T* b;    // (C) bias
  int N;         // rows
  int C;         // channels, % 8 == 0
};

// Grid: ceil(N / warps) blocks of `warps` warps; smem warps * C floats.
template <typename T>
__global__ void ln_forward_kernel(const __grid_constant__ LnFwdParams<T> p) {
  using P = Pack16<T>;
  extern __shared__ float smem[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int row = blockIdx.x * (blockDim.x / 32) + warp;
  if (row >= p.N) return;
  float* xs = smem + static_cast<size_t>(warp) * p.C;  // (C) this row in fp32
  const size_t off = static_cast<size_t>(row) * p.C;

  float sum = 0.f;
  for (int c = lane * P::kN; c < p.C; c += 32 * P::kN) {
    P x = P::load(p.inp + off + c);
    if (p.y != nullptr) {
      const P y = P::load(p.y + off + c);
#pragma unroll
      for (int j = 0; j < P::kN; ++j) x.v[j] = from_f32<T>(to_f32(x.v[j]) + to_f32(y.v[j]));
      x.store(p.residual + off + c);
    }
#pragma unroll
    for (int j = 0; j < P::kN; ++j) {
      xs[c + j] = to_f32(x.v[j]);
      sum += xs[c + j];
    }
  }
  const float mean = warp_sum(sum) / p.C;
  float sq = 0.f;
  for (int c = lane * P::kN; c < p.C; c += 32 * P::kN) {
#pragma unroll
    for (int j = 0; j < P::kN; ++j) {
      const float d = xs[c + j] - mean;
      sq += d * d;
    }
  }
  const float rstd = 1.f / sqrtf(warp_sum(sq) / p.C + kEps);
  for (int c = lane * P::kN; c < p.C; c += 32 * P::kN) {
    const P w = P::load(p.w + c), b = P::load(p.b + c);
    P o;
#pragma unroll
    for (int j = 0; j < P::kN; ++j)
      o.v[j] = from_f32<T>((xs[c + j] - mean) * rstd * to_f32(w.v[j]) + to_f32(b.v[j]));
    o.store(p.out + off + c);
  }
  if (lane == 0) {
    if (p.mean) p.mean[row] = mean;
    if (p.rstd) p.rstd[row] = rstd;
  }
}

template <typename T>
struct LnBwdParams {
  T* dinp;            // (N, C) += input gradient
  float* partials;    // (gridDim.x, 2, C) per-block dw then db partial sums, overwritten
  const T* dout;      // (N, C) output gradient
  const T* inp;       // (N, C) forward input
  const T* w;         // (C) gain
  const float* mean;  // (N) forward row means
  const float* rstd;  // (N) forward row 1/std
  int N;              // rows
  int C;              // channels, % 8 == 0
};

// Grid: fixed G blocks of W warps; warp (b, w) handles rows b*W + w + k*G*W in order and
// accumulates its dw/db in its own smem slice (2 C floats); at the end the block sums its
// warps in warp order into partials[b]. Same N, C => same grid => same bits.
template <typename T>
__global__ void ln_backward_kernel(const __grid_constant__ LnBwdParams<T> p) {
  using P = Pack16<T>;
  extern __shared__ float smem[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  float* acc = smem + static_cast<size_t>(warp) * 2 * p.C;  // (2, C): dw, db of this warp
  for (int c = lane; c < 2 * p.C; c += 32) acc[c] = 0.f;
  __syncwarp();
  for (int row = blockIdx.x * nwarps + warp; row < p.N; row += gridDim.x * nwarps) {
    const size_t off = static_cast<size_t>(row) * p.C;
    const float m = p.mean[row], s = p.rstd[row];
    float sum_dnorm = 0.f, sum_dnorm_norm = 0.f;
    for (int c = lane * P::kN; c < p.C; c += 32 * P::kN) {
      const P x = P::load(p.inp + off + c), dy = P::load(p.dout + off + c), w = P::load(p.w + c);
#pragma unroll
      for (int j = 0; j < P::kN; ++j) {
        const float norm = (to_f32(x.v[j]) - m) * s;
        const float g = to_f32(dy.v[j]);
        const float dnorm = g * to_f32(w.v[j]);
        sum_dnorm += dnorm;
        sum_dnorm_norm += dnorm * norm;
        acc[c + j] += g * norm;
        acc[p.C + c + j] += g;
      }
    }
    const float mean_dnorm = warp_sum(sum_dnorm) / p.C;
    const float mean_dnorm_norm = warp_sum(sum_dnorm_norm) / p.C;
    for (int c = lane * P::kN; c < p.C; c += 32 * P::kN) {
      const P x = P::load(p.inp + off + c), dy = P::load(p.dout + off + c), w = P::load(p.w + c);
      P dx = P::load(p.dinp + off + c);
#pragma unroll
      for (int j = 0; j < P::kN; ++j) {
        const float norm = (to_f32(x.v[j]) - m) * s;
        const float dnorm = to_f32(dy.v[j]) * to_f32(w.v[j]);
        dx.v[j] = from_f32<T>(to_f32(dx.v[j]) + s * (dnorm - mean_dnorm - norm * mean_dnorm_norm));
      }
      dx.store(p.dinp + off + c);
    }
  }
  __syncthreads();
  float* out = p.partials + static_cast<size_t>(blockIdx.x) * 2 * p.C;
  for (int c = threadIdx.x; c < 2 * p.C; c += blockDim.x) {
    float t = 0.f;
    for (int w = 0; w < nwarps; ++w) t += smem[static_cast<size_t>(w) * 2 * p.C + c];
    out[c] = t;
  }
}

template <typename T>
struct LnReduceParams {
  T* dw;                  // (C) += sum of partial dw
  T* db;                  // (C) += sum of partial db
  const float* partials;  // (blocks, 2, C)
  int blocks;             // partial rows to sum, in order
  int C;                  // channels
};

// One thread per entry of (2, C): sums the blocks' partials in block order.
template <typename T>
__global__ void ln_reduce_kernel(const __grid_constant__ LnReduceParams<T> p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= 2 * p.C) return;
  float t = 0.f;
  for (int b = 0; b < p.blocks; ++b) t += p.partials[static_cast<size_t>(b) * 2 * p.C + i];
  T* dst = i < p.C ? p.dw + i : p.db + (i - p.C);
  *dst = from_f32<T>(to_f32(*dst) + t);
}

// Warps per block whose fp32 smem (floats_per_warp each) fits the default 48 KB, in [1, 8].
int warps_for(int floats_per_warp) {
  const int w = static_cast<int>(kDefaultSmem / (sizeof(float) * floats_per_warp));
  return std::max(1, std::min(8, w));
}

int bwd_blocks(int N, int C) {
  return std::max(1, std::min(kBwdMaxBlocks, ceil_div(N, warps_for(2 * C))));
}

// Raises the kernel's dynamic smem limit when `bytes` exceeds the default.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSmem)
    REMAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
}

void check_shape(const char* who, int N, int C) {
  REMAT_CHECK(N >= 0 && C > 0 && C % 8 == 0 && C <= kMaxC,
              std::string(who) + ": need N >= 0 and 0 < C <= 16384 with C % 8 == 0, got N=" +
                  std::to_string(N) + " C=" + std::to_string(C));
}

template <typename T>
void forward_impl(const char* who, T* residual, T* out, float* mean, float* rstd, const T* inp,
                  const T* y, const T* w, const T* b, int N, int C, cudaStream_t stream) {
  check_shape(who, N, C);
  if (N == 0) return;
  REMAT_CHECK(out && inp && w && b && (y == nullptr || residual),
              std::string(who) + ": null pointer");
  REMAT_CHECK(aligned16(out) && aligned16(inp) && aligned16(w) && aligned16(b) &&
                  (y == nullptr || (aligned16(y) && aligned16(residual))),
              std::string(who) + ": pointers must be 16-byte aligned");
  NvtxRange range(who);
  LnFwdParams<T> p{out, mean, rstd, residual, inp, y, w, b, N, C};
  const int warps = warps_for(C);
  const size_t smem = static_cast<size_t>(warps) * C * sizeof(float);
  allow_smem(ln_forward_kernel<T>, smem);
  ln_forward_kernel<T><<<ceil_div(N, warps), warps * 32, smem, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

}  // namespace

template <typename Elem>
void layernorm_forward(Elem* out, float* mean, float* rstd, const Elem* inp, const Elem* w,
                       const Elem* b, int N, int C, cudaStream_t stream) {
  forward_impl<Elem>("layernorm_forward", nullptr, out, mean, rstd, inp, nullptr, w, b, N, C,
                     stream);
}

template <typename Elem>
void residual_layernorm_forward(Elem* residual, Elem* out, float* mean, float* rstd, const Elem* x,
                                const Elem* y, const Elem* w, const Elem* b, int N, int C,
                                cudaStream_t stream) {
  REMAT_CHECK(N == 0 || y != nullptr, "residual_layernorm_forward: null y");
  forward_impl<Elem>("residual_layernorm_forward", residual, out, mean, rstd, x, y, w, b, N, C,
                     stream);
}

size_t layernorm_backward_workspace_floats(int N, int C) {
  return static_cast<size_t>(bwd_blocks(N, C)) * 2 * C;
}

template <typename Elem>
void layernorm_backward(Elem* dinp, Elem* dw, Elem* db, const Elem* dout, const Elem* inp,
                        const Elem* w, const float* mean, const float* rstd, int N, int C,
                        float* workspace, cudaStream_t stream) {
  check_shape("layernorm_backward", N, C);
  if (N == 0) return;
  REMAT_CHECK(dinp && dw && db && dout && inp && w && mean && rstd && workspace,
              "layernorm_backward: null pointer");
  REMAT_CHECK(aligned16(dinp) && aligned16(dout) && aligned16(inp) && aligned16(w),
              "layernorm_backward: pointers must be 16-byte aligned");
  NvtxRange range("layernorm_backward");
  const int warps = warps_for(2 * C), blocks = bwd_blocks(N, C);
  const size_t smem = static_cast<size_t>(warps) * 2 * C * sizeof(float);
  allow_smem(ln_backward_kernel<Elem>, smem);
  LnBwdParams<Elem> p{dinp, workspace, dout, inp, w, mean, rstd, N, C};
  ln_backward_kernel<Elem><<<blocks, warps * 32, smem, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
  LnReduceParams<Elem> r{dw, db, workspace, blocks, C};
  ln_reduce_kernel<Elem><<<ceil_div(2 * C, 256), 256, 0, stream>>>(r);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

#define REMAT_INSTANTIATE(T)                                                                     \
  template void layernorm_forward<T>(T*, float*, float*, const T*, const T*, const T*, int, int, \
                                     cudaStream_t);                                              \
  template void residual_layernorm_forward<T>(T*, T*, float*, float*, const T*, const T*,        \
                                              const T*, const T*, int, int, cudaStream_t);       \
  template void layernorm_backward<T>(T*, T*, T*, const T*, const T*, const T*, const float*,    \
                                      const float*, int, int, float*, cudaStream_t);
REMAT_INSTANTIATE(float)
REMAT_INSTANTIATE(__nv_bfloat16)
#undef REMAT_INSTANTIATE

}  // namespace remat::cuda
