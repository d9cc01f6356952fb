// LayerNorm (plain and fused with the residual add) forward, and backward with a
// deterministic dw/db reduction.
//
// No shared-memory row staging: every global access is one 16-byte vector (C % 8 == 0) and a
// row lives in registers. A row belongs to a group of R warps (see row_shape): thread t of the
// group owns the row's 16-byte packs t, t + 32 R, ... (K of them at most, K a template
// parameter), so R = 1 for the usual widths (C <= 768 bf16 takes 3 packs a lane) and R grows
// with C. Group sums are a warp_sum, then, for R > 1, one float per warp through shared memory
// between two named barriers of the group (groups of one block never wait for each other).
//   forward   one row per group; pass 1 loads the row (writing the residual first when
//             fused) and sums it, pass 2 sums the squared deviations from the mean (two-pass
//             variance, as the CPU reference), pass 3 writes out. Plain and fused run the same
//             instructions on the same values, hence bitwise equal outputs. For R = 1 the
//             arithmetic is that of the former shared-memory version, in the same order.
//   backward  a fixed grid of G <= 256 blocks; group g of block b takes rows b groups + g,
//             then + G groups, ... in order, keeping its dw/db partials in registers; the two
//             row sums share one group reduction. At the end the block adds its groups'
//             partials in group order (through 2C floats of shared memory, float4 accesses)
//             into partials[b]; then one thread per entry sums the G partial rows in block
//             order. Same N, C: same grid, same bits.
#include <type_traits>

#include "kernels/cuda_common.cuh"
#include "kernels/layernorm.h"

namespace remat::cuda {
namespace {

constexpr float kEps = 1e-5f;
constexpr int kMaxC = 16384;
constexpr int kBlockThreads = 256;  // threads of a block when rows need fewer warps
constexpr int kMaxWarps = 16;       // warps per block at most (R <= 16 for C <= 16384)
constexpr int kBwdMaxBlocks = 256;  // fixed grid of the backward: partial rows of dw/db
// Packs a forward thread holds (the row, as stored: 8 packs = 32 registers); floats of dw/db
// partials a backward thread accumulates per kind (32: 64 registers for dw and db).
constexpr int kFwdMaxPacks = 8;
constexpr int kBwdMaxElems = 32;

// How a row of C channels maps onto threads. Depends on C and the element type only.
struct RowShape {
  int warps;   // R: warps per row (one row group)
  int groups;  // row groups per block
  int packs;   // K: packs per thread at most, one of the instantiated counts
  int threads() const { return 32 * warps * groups; }
};

// The instantiated K: the smallest of these >= what the row needs.
int round_packs(int k) {
  for (int c : {1, 2, 3, 4, 6, 8})
    if (k <= c) return c;
  return -1;  // unreachable for C <= kMaxC (checked)
}

RowShape row_shape(int row_packs, int max_packs) {
  RowShape s;
  s.warps = ceil_div(row_packs, 32 * max_packs);
  s.packs = round_packs(ceil_div(row_packs, 32 * s.warps));
  s.groups = std::max(1, kBlockThreads / (32 * s.warps));
  return s;
}

template <typename T>
RowShape fwd_shape(int C) {
  return row_shape(C / Pack16<T>::kN, kFwdMaxPacks);
}
template <typename T>
RowShape bwd_shape(int C) {
  return row_shape(C / Pack16<T>::kN, kBwdMaxElems / Pack16<T>::kN);
}

// This thread's place in its row group.
struct RowGroup {
  int t;           // index within the group
  int size;        // threads in the group (32 R)
  int warps;       // R
  int index;       // the group's index in the block
  int first_warp;  // the group's first warp in the block
};

__device__ __forceinline__ RowGroup row_group(int warps) {
  RowGroup g;
  g.warps = warps;
  g.size = 32 * warps;
  g.index = threadIdx.x / g.size;
  g.t = threadIdx.x % g.size;
  g.first_warp = g.index * warps;
  return g;
}

// Barrier of the group's threads only (named barrier 1 + group index; 0 is __syncthreads').
__device__ __forceinline__ void group_barrier(const RowGroup& g) {
  asm volatile("bar.sync %0, %1;" ::"r"(1 + g.index), "r"(g.size) : "memory");
}

// Sum over the group in a fixed order; every thread of the group gets it. `red` holds one
// float per warp of the block.
__device__ __forceinline__ float group_sum(float x, float* red, const RowGroup& g) {
  x = warp_sum(x);
  if (g.warps == 1) return x;
  group_barrier(g);  // red may still be read by the group's previous sum
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  group_barrier(g);
  float s = 0.f;
  for (int w = 0; w < g.warps; ++w) s += red[g.first_warp + w];
  return s;
}

// Two sums at once (one pair of barriers).
__device__ __forceinline__ float2 group_sum2(float2 x, float2* red, const RowGroup& g) {
  x.x = warp_sum(x.x);
  x.y = warp_sum(x.y);
  if (g.warps == 1) return x;
  group_barrier(g);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = x;
  group_barrier(g);
  float2 s = make_float2(0.f, 0.f);
  for (int w = 0; w < g.warps; ++w) {
    const float2 v = red[g.first_warp + w];
    s.x += v.x;
    s.y += v.y;
  }
  return s;
}

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
  int warps;     // R: warps per row (fwd_shape)
};

// Grid: ceil(N / groups) blocks of fwd_shape(C).threads(); one row per group; K packs per
// thread at most. No dynamic shared memory. A thread writes only packs it has read (in-place
// out == inp, residual == inp are safe).
template <typename T, int K>
__global__ void __launch_bounds__(32 * kMaxWarps)
    ln_forward_kernel(const __grid_constant__ LnFwdParams<T> p) {
  using P = Pack16<T>;
  __shared__ float red[kMaxWarps];
  const RowGroup g = row_group(p.warps);
  const int row = blockIdx.x * (blockDim.x / g.size) + g.index;
  if (row >= p.N) return;  // the whole group leaves: its barriers are its own
  const int packs = p.C / P::kN;
  const size_t off = static_cast<size_t>(row) * p.C;

  P x[K];  // this thread's packs of the row (the residual as stored when fused)
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int pk = g.t + k * g.size;
    if (pk < packs) {
      const int c = pk * P::kN;
      x[k] = P::load(p.inp + off + c);
      if (p.y != nullptr) {
        const P y = P::load(p.y + off + c);
#pragma unroll
        for (int j = 0; j < P::kN; ++j) x[k].v[j] = from_f32<T>(to_f32(x[k].v[j]) + to_f32(y.v[j]));
        x[k].store(p.residual + off + c);
      }
#pragma unroll
      for (int j = 0; j < P::kN; ++j) sum += to_f32(x[k].v[j]);
    }
  }
  const float mean = group_sum(sum, red, g) / p.C;
  float sq = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    if (g.t + k * g.size < packs) {
#pragma unroll
      for (int j = 0; j < P::kN; ++j) {
        const float d = to_f32(x[k].v[j]) - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = 1.f / sqrtf(group_sum(sq, red, g) / p.C + kEps);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int pk = g.t + k * g.size;
    if (pk < packs) {
      const int c = pk * P::kN;
      const P w = P::load(p.w + c), b = P::load(p.b + c);
      P o;
#pragma unroll
      for (int j = 0; j < P::kN; ++j)
        o.v[j] = from_f32<T>((to_f32(x[k].v[j]) - mean) * rstd * to_f32(w.v[j]) + to_f32(b.v[j]));
      o.store(p.out + off + c);
    }
  }
  if (g.t == 0) {
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
  int warps;          // R: warps per row (bwd_shape)
  bool vec_partials;  // partials is 16-byte aligned (float4 stores)
};

// Stores 4 floats at dst (a multiple of 4 floats from a 16-byte aligned base when vec).
__device__ __forceinline__ void store4(float* dst, float4 v, bool vec) {
  if (vec) {
    *reinterpret_cast<float4*>(dst) = v;
  } else {
    dst[0] = v.x;
    dst[1] = v.y;
    dst[2] = v.z;
    dst[3] = v.w;
  }
}

// Grid: G blocks (bwd_blocks) of bwd_shape(C).threads(); dynamic shared memory 2C floats when
// a block has more than one group, else none. With norm = (x - mean) rstd and
// dnorm = dout w:
//   dinp += rstd (dnorm - mean(dnorm) - norm mean(dnorm norm)),
//   dw partial += dout norm, db partial += dout.
template <typename T, int K>
__global__ void __launch_bounds__(32 * kMaxWarps)
    ln_backward_kernel(const __grid_constant__ LnBwdParams<T> p) {
  using P = Pack16<T>;
  // x and dout of the row stay in registers between the passes while dw/db (2 K kN floats)
  // and the kept packs (8 K registers) leave room in the 128 registers; else pass 2 reloads
  // them (L1 hits: the thread read them a moment ago).
  constexpr bool kKeepRow = K * (2 * P::kN + 8) <= 72;
  // The groups' partials, in turn: (2, kN / 4, packs) float4, i.e. dw then db, each pack's
  // q-th float4 at [q][pack] so that a warp's accesses fall on distinct banks.
  extern __shared__ float4 combine[];
  __shared__ float2 red[kMaxWarps];
  const RowGroup g = row_group(p.warps);
  const int groups = blockDim.x / g.size;
  const int packs = p.C / P::kN;

  float dw[K][P::kN], db[K][P::kN];  // this thread's packs, rows in order
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int j = 0; j < P::kN; ++j) dw[k][j] = db[k][j] = 0.f;

  for (int row = blockIdx.x * groups + g.index; row < p.N; row += gridDim.x * groups) {
    const size_t off = static_cast<size_t>(row) * p.C;
    const float m = p.mean[row], s = p.rstd[row];
    P xs[kKeepRow ? K : 1], dys[kKeepRow ? K : 1];
    float sum_dnorm = 0.f, sum_dnorm_norm = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int pk = g.t + k * g.size;
      if (pk < packs) {
        const int c = pk * P::kN;
        const P x = P::load(p.inp + off + c), dy = P::load(p.dout + off + c);
        const P w = P::load(p.w + c);
        if constexpr (kKeepRow) {
          xs[k] = x;
          dys[k] = dy;
        }
#pragma unroll
        for (int j = 0; j < P::kN; ++j) {
          const float norm = (to_f32(x.v[j]) - m) * s;
          const float gj = to_f32(dy.v[j]);
          const float dnorm = gj * to_f32(w.v[j]);
          sum_dnorm += dnorm;
          sum_dnorm_norm += dnorm * norm;
          dw[k][j] += gj * norm;
          db[k][j] += gj;
        }
      }
    }
    const float2 sums = group_sum2(make_float2(sum_dnorm, sum_dnorm_norm), red, g);
    const float mean_dnorm = sums.x / p.C, mean_dnorm_norm = sums.y / p.C;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int pk = g.t + k * g.size;
      if (pk < packs) {
        const int c = pk * P::kN;
        P x, dy;
        if constexpr (kKeepRow) {
          x = xs[k];
          dy = dys[k];
        } else {
          x = P::load(p.inp + off + c);
          dy = P::load(p.dout + off + c);
        }
        const P w = P::load(p.w + c);
        P dx = P::load(p.dinp + off + c);
#pragma unroll
        for (int j = 0; j < P::kN; ++j) {
          const float norm = (to_f32(x.v[j]) - m) * s;
          const float dnorm = to_f32(dy.v[j]) * to_f32(w.v[j]);
          dx.v[j] =
              from_f32<T>(to_f32(dx.v[j]) + s * (dnorm - mean_dnorm - norm * mean_dnorm_norm));
        }
        dx.store(p.dinp + off + c);
      }
    }
  }

  // The block's partial row = its groups' partials added in group order; the last group
  // writes it out. Every thread of the block gets here (no early exit above).
  float* out = p.partials + static_cast<size_t>(blockIdx.x) * 2 * p.C;
  const int quads = p.C / 4;  // float4s per kind
  for (int turn = 0; turn < groups; ++turn) {
    if (groups > 1) __syncthreads();  // the previous turn's combine[] writes are visible
    if (g.index != turn) continue;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int pk = g.t + k * g.size;
      if (pk < packs) {
#pragma unroll
        for (int q = 0; q < P::kN / 4; ++q) {
          const int i = pk * (P::kN / 4) + q;  // float4 index of the channels in a kind
          const int si = q * packs + pk;       // its place in combine[] (no bank conflicts)
          float4 vw =
              make_float4(dw[k][4 * q], dw[k][4 * q + 1], dw[k][4 * q + 2], dw[k][4 * q + 3]);
          float4 vb =
              make_float4(db[k][4 * q], db[k][4 * q + 1], db[k][4 * q + 2], db[k][4 * q + 3]);
          if (turn > 0) {
            const float4 aw = combine[si], ab = combine[quads + si];
            vw = make_float4(aw.x + vw.x, aw.y + vw.y, aw.z + vw.z, aw.w + vw.w);
            vb = make_float4(ab.x + vb.x, ab.y + vb.y, ab.z + vb.z, ab.w + vb.w);
          }
          if (turn == groups - 1) {
            store4(out + 4 * i, vw, p.vec_partials);
            store4(out + p.C + 4 * i, vb, p.vec_partials);
          } else {
            combine[si] = vw;
            combine[quads + si] = vb;
          }
        }
      }
    }
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

template <typename T>
int bwd_blocks(int N, int C) {
  return std::max(1, std::min(kBwdMaxBlocks, ceil_div(N, bwd_shape<T>(C).groups)));
}

// Calls fn(std::integral_constant<int, K>) for K == k; instantiates only K <= kMax.
template <int kMax, typename Fn>
void with_packs(int k, Fn&& fn) {
  REMAT_CHECK(k <= kMax, "layernorm: no kernel for " + std::to_string(k) + " packs per thread");
  auto call = [&](auto kk) {
    if constexpr (decltype(kk)::value <= kMax) fn(kk);
  };
  switch (k) {
    case 1:
      return call(std::integral_constant<int, 1>{});
    case 2:
      return call(std::integral_constant<int, 2>{});
    case 3:
      return call(std::integral_constant<int, 3>{});
    case 4:
      return call(std::integral_constant<int, 4>{});
    case 6:
      return call(std::integral_constant<int, 6>{});
    default:
      return call(std::integral_constant<int, 8>{});
  }
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
  const RowShape shape = fwd_shape<T>(C);
  const LnFwdParams<T> p{out, mean, rstd, residual, inp, y, w, b, N, C, shape.warps};
  with_packs<kFwdMaxPacks>(shape.packs, [&](auto k) {
    ln_forward_kernel<T, decltype(k)::value>
        <<<ceil_div(N, shape.groups), shape.threads(), 0, stream>>>(p);
  });
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

// The larger of the two element types' needs, so the answer does not depend on Elem.
size_t layernorm_backward_workspace_floats(int N, int C) {
  if (C <= 0 || C % 8 != 0 || C > kMaxC) return 0;  // the launcher refuses such shapes
  const int blocks = std::max(bwd_blocks<float>(N, C), bwd_blocks<__nv_bfloat16>(N, C));
  return static_cast<size_t>(blocks) * 2 * C;
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
  const RowShape shape = bwd_shape<Elem>(C);
  const int blocks = bwd_blocks<Elem>(N, C);
  const size_t smem = shape.groups > 1 ? 2 * static_cast<size_t>(C) * sizeof(float) : 0;
  const LnBwdParams<Elem> p{dinp,        workspace,           dout, inp, w, mean, rstd, N, C,
                            shape.warps, aligned16(workspace)};
  with_packs<kBwdMaxElems / Pack16<Elem>::kN>(shape.packs, [&](auto k) {
    ln_backward_kernel<Elem, decltype(k)::value><<<blocks, shape.threads(), smem, stream>>>(p);
  });
  REMAT_CUDA_LAUNCH_CHECK(stream);
  const LnReduceParams<Elem> r{dw, db, workspace, blocks, C};
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
