// RMSNorm (plain and fused with the residual add) forward, and backward with a deterministic
// dw reduction.
//
// No shared-memory row staging: every global access is one 16-byte vector (C % 8 == 0), and
// the only shared memory is block_sum's 32 floats.
//   forward   one warp per row; lane l owns the row's 16-byte packs l, l + 32, ... Pass 1
//             sums squares (writing the residual first when fused); pass 2 re-reads the packs
//             this lane just read or wrote (L1 hits) and writes out. Plain and fused run the
//             same instructions on the same values, hence bitwise equal outputs.
//   backward  a fixed grid of G = min(256, N) blocks; block b takes rows b, b + G, ... in
//             order, the whole block on one row at a time: thread t owns packs t, t + 256, ...
//             (kPacks at most) and keeps their dw partial in registers; the row's
//             sum(g * xhat) is a block_sum. Then one thread per channel sums the G partial
//             rows in block order. Same N, C: same grid, same bits.
#include "kernels/cuda_common.cuh"
#include "kernels/rmsnorm.h"

namespace remat::cuda {
namespace {

constexpr int kMaxC = 16384;
constexpr int kFwdWarps = 8;        // rows per forward block
constexpr int kBwdThreads = 256;    // threads per backward block (at most)
constexpr int kBwdMaxBlocks = 256;  // fixed grid of the backward: partial rows of dw

template <typename T>
struct RmsFwdParams {
  T* out;        // (N, C) normalized output, overwritten
  float* rstd;   // (N) row 1 / rms, or null
  T* residual;   // (N, C) = inp + y (rounded to T) when y is set; else unused
  const T* inp;  // (N, C) input (first residual addend when y is set)
  const T* y;    // (N, C) second residual addend, or null (plain RMSNorm)
  const T* w;    // (C) gain
  int N;         // rows
  int C;         // channels, % 8 == 0
  float eps;     // added to the mean square
};

// Grid: ceil(N / kFwdWarps) blocks of kFwdWarps warps, one row per warp; no shared memory.
template <typename T>
__global__ void __launch_bounds__(kFwdWarps * 32)
    rms_forward_kernel(const __grid_constant__ RmsFwdParams<T> p) {
  using P = Pack16<T>;
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= p.N) return;
  const size_t off = static_cast<size_t>(row) * p.C;
  // Pass 2 normalizes the residual as stored (the fused case) or inp. Either way a lane
  // re-reads only the packs it read or wrote itself in pass 1, so aliasing (residual == inp,
  // out == residual) is safe.
  const T* x_row = (p.y != nullptr ? p.residual : p.inp) + off;

  float sq = 0.f;
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
      const float v = to_f32(x.v[j]);
      sq = fmaf(v, v, sq);
    }
  }
  const float rstd = 1.f / sqrtf(warp_sum(sq) / static_cast<float>(p.C) + p.eps);
  for (int c = lane * P::kN; c < p.C; c += 32 * P::kN) {
    const P x = P::load(x_row + c), w = P::load(p.w + c);
    P o;
#pragma unroll
    for (int j = 0; j < P::kN; ++j) o.v[j] = from_f32<T>(to_f32(x.v[j]) * rstd * to_f32(w.v[j]));
    o.store(p.out + off + c);
  }
  if (lane == 0 && p.rstd != nullptr) p.rstd[row] = rstd;
}

template <typename T>
struct RmsBwdParams {
  T* dinp;            // (N, C) += input gradient
  float* partials;    // (gridDim.x, C) per-block dw partial sums, overwritten
  const T* dout;      // (N, C) output gradient
  const T* inp;       // (N, C) forward input
  const T* w;         // (C) gain
  const float* rstd;  // (N) forward row 1 / rms
  int N;              // rows
  int C;              // channels, % 8 == 0
};

// Grid: G blocks (see bwd_blocks) of blockDim threads (a multiple of 32, blockDim * kPacks
// packs >= C / kN). With xhat = x * rstd and g = dout * w:
//   dinp += rstd * (g - xhat * mean(g * xhat)),  dw partial += dout * xhat.
template <typename T, int kPacks>
__global__ void __launch_bounds__(kBwdThreads)
    rms_backward_kernel(const __grid_constant__ RmsBwdParams<T> p) {
  using P = Pack16<T>;
  __shared__ float scratch[32];
  const int packs = p.C / P::kN;
  float acc[kPacks][P::kN];  // dw partial of this thread's packs, rows in order
#pragma unroll
  for (int k = 0; k < kPacks; ++k)
#pragma unroll
    for (int j = 0; j < P::kN; ++j) acc[k][j] = 0.f;

  for (int row = blockIdx.x; row < p.N; row += gridDim.x) {
    const size_t off = static_cast<size_t>(row) * p.C;
    const float s = p.rstd[row];
    float part = 0.f;  // this thread's share of sum(g * xhat)
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int pk = threadIdx.x + k * blockDim.x;
      if (pk < packs) {
        const int c = pk * P::kN;
        const P x = P::load(p.inp + off + c), dy = P::load(p.dout + off + c);
        const P w = P::load(p.w + c);
#pragma unroll
        for (int j = 0; j < P::kN; ++j) {
          const float xh = to_f32(x.v[j]) * s, d = to_f32(dy.v[j]);
          part = fmaf(d * to_f32(w.v[j]), xh, part);
          acc[k][j] = fmaf(d, xh, acc[k][j]);
        }
      }
    }
    const float mean_gx = block_sum(part, scratch) / static_cast<float>(p.C);
#pragma unroll
    for (int k = 0; k < kPacks; ++k) {
      const int pk = threadIdx.x + k * blockDim.x;
      if (pk < packs) {
        const int c = pk * P::kN;
        const P x = P::load(p.inp + off + c), dy = P::load(p.dout + off + c);
        const P w = P::load(p.w + c);
        P dx = P::load(p.dinp + off + c);
#pragma unroll
        for (int j = 0; j < P::kN; ++j) {
          const float xh = to_f32(x.v[j]) * s, g = to_f32(dy.v[j]) * to_f32(w.v[j]);
          dx.v[j] = from_f32<T>(to_f32(dx.v[j]) + s * (g - xh * mean_gx));
        }
        dx.store(p.dinp + off + c);
      }
    }
  }
  float* out = p.partials + static_cast<size_t>(blockIdx.x) * p.C;
#pragma unroll
  for (int k = 0; k < kPacks; ++k) {
    const int pk = threadIdx.x + k * blockDim.x;
    if (pk < packs) {
#pragma unroll
      for (int q = 0; q < P::kN / 4; ++q)
        *reinterpret_cast<float4*>(out + pk * P::kN + 4 * q) =
            make_float4(acc[k][4 * q], acc[k][4 * q + 1], acc[k][4 * q + 2], acc[k][4 * q + 3]);
    }
  }
}

template <typename T>
struct RmsReduceParams {
  T* dw;                  // (C) += sum of the partials
  const float* partials;  // (blocks, C)
  int blocks;             // partial rows to sum, in order
  int C;                  // channels
};

// One thread per channel: sums the blocks' partials in block order.
template <typename T>
__global__ void rms_reduce_kernel(const __grid_constant__ RmsReduceParams<T> p) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= p.C) return;
  float t = 0.f;
  for (int b = 0; b < p.blocks; ++b) t += p.partials[static_cast<size_t>(b) * p.C + c];
  p.dw[c] = from_f32<T>(to_f32(p.dw[c]) + t);
}

int bwd_blocks(int N) {
  return std::max(1, std::min(kBwdMaxBlocks, N));
}

// Backward block size: one pack per thread for small rows, else kBwdThreads.
template <typename T>
int bwd_threads(int C) {
  const int packs = C / Pack16<T>::kN;
  return std::min(kBwdThreads, ceil_div(packs, 32) * 32);
}

void check_shape(const char* who, int N, int C, float eps) {
  REMAT_CHECK(N >= 0 && C > 0 && C % 8 == 0 && C <= kMaxC,
              std::string(who) + ": need N >= 0 and 0 < C <= 16384 with C % 8 == 0, got N=" +
                  std::to_string(N) + " C=" + std::to_string(C));
  REMAT_CHECK(eps >= 0.f, std::string(who) + ": eps must be >= 0");
}

template <typename T>
void forward_impl(const char* who, T* residual, T* out, float* rstd, const T* inp, const T* y,
                  const T* w, int N, int C, float eps, cudaStream_t stream) {
  check_shape(who, N, C, eps);
  if (N == 0) return;
  REMAT_CHECK(out && inp && w && (y == nullptr || residual), std::string(who) + ": null pointer");
  REMAT_CHECK(aligned16(out) && aligned16(inp) && aligned16(w) &&
                  (y == nullptr || (aligned16(y) && aligned16(residual))),
              std::string(who) + ": pointers must be 16-byte aligned");
  NvtxRange range(who);
  const RmsFwdParams<T> p{out, rstd, residual, inp, y, w, N, C, eps};
  rms_forward_kernel<T><<<ceil_div(N, kFwdWarps), kFwdWarps * 32, 0, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

template <typename T, int kPacks>
void launch_backward(const RmsBwdParams<T>& p, int blocks, int threads, cudaStream_t stream) {
  rms_backward_kernel<T, kPacks><<<blocks, threads, 0, stream>>>(p);
}

}  // namespace

template <typename Elem>
void rmsnorm_forward(Elem* out, float* rstd, const Elem* inp, const Elem* w, int N, int C,
                     float eps, cudaStream_t stream) {
  forward_impl<Elem>("rmsnorm_forward", nullptr, out, rstd, inp, nullptr, w, N, C, eps, stream);
}

template <typename Elem>
void residual_rmsnorm_forward(Elem* residual, Elem* out, float* rstd, const Elem* x, const Elem* y,
                              const Elem* w, int N, int C, float eps, cudaStream_t stream) {
  REMAT_CHECK(N == 0 || y != nullptr, "residual_rmsnorm_forward: null y");
  forward_impl<Elem>("residual_rmsnorm_forward", residual, out, rstd, x, y, w, N, C, eps, stream);
}

size_t rmsnorm_backward_workspace_floats(int N, int C) {
  return static_cast<size_t>(bwd_blocks(N)) * std::max(C, 0);
}

template <typename Elem>
void rmsnorm_backward(Elem* dinp, Elem* dw, const Elem* dout, const Elem* inp, const Elem* w,
                      const float* rstd, int N, int C, float* workspace, cudaStream_t stream) {
  check_shape("rmsnorm_backward", N, C, 0.f);
  if (N == 0) return;
  REMAT_CHECK(dinp && dw && dout && inp && w && rstd && workspace,
              "rmsnorm_backward: null pointer");
  REMAT_CHECK(
      aligned16(dinp) && aligned16(dout) && aligned16(inp) && aligned16(w) && aligned16(workspace),
      "rmsnorm_backward: pointers must be 16-byte aligned");
  NvtxRange range("rmsnorm_backward");
  const int blocks = bwd_blocks(N), threads = bwd_threads<Elem>(C);
  // Packs per thread: <= 16 in fp32, <= 8 in bf16 (C <= 16384).
  const int per_thread = ceil_div(C / Pack16<Elem>::kN, threads);
  const RmsBwdParams<Elem> p{dinp, workspace, dout, inp, w, rstd, N, C};
  if (per_thread <= 1) {
    launch_backward<Elem, 1>(p, blocks, threads, stream);
  } else if (per_thread <= 2) {
    launch_backward<Elem, 2>(p, blocks, threads, stream);
  } else if (per_thread <= 4) {
    launch_backward<Elem, 4>(p, blocks, threads, stream);
  } else if (per_thread <= 8) {
    launch_backward<Elem, 8>(p, blocks, threads, stream);
  } else if constexpr (Pack16<Elem>::kN == 4) {  // fp32 rows over 8192 channels
    launch_backward<Elem, 16>(p, blocks, threads, stream);
  }
  REMAT_CUDA_LAUNCH_CHECK(stream);
  const RmsReduceParams<Elem> r{dw, workspace, blocks, C};
  rms_reduce_kernel<Elem><<<ceil_div(C, 256), 256, 0, stream>>>(r);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

#define REMAT_INSTANTIATE(T)                                                                       \
  template void rmsnorm_forward<T>(T*, float*, const T*, const T*, int, int, float, cudaStream_t); \
  template void residual_rmsnorm_forward<T>(T*, T*, float*, const T*, const T*, const T*, int,     \
                                            int, float, cudaStream_t);                             \
  template void rmsnorm_backward<T>(T*, T*, const T*, const T*, const T*, const float*, int, int,  \
                                    float*, cudaStream_t);
REMAT_INSTANTIATE(float)
REMAT_INSTANTIATE(__nv_bfloat16)
#undef REMAT_INSTANTIATE

}  // namespace remat::cuda
