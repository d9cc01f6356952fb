// Causal flash attention, forward and backward.
//
// bf16, HD in {64, 128}: tensor-core kernels (mma.sync m16n8k16, bf16 in, fp32 accumulate),
// tiles staged in padded shared memory by cp.async, fragments loaded by ldmatrix.
//   forward   grid (T/64 query blocks, B*NH), 4 warps x 16 query rows; online softmax in
//             registers (base-2 exponentials); keeps out and lse (natural log).
//   backward  1. D = rowsum(dout * out)                 (one warp per row)
//             2. dK, dV: grid (T/64 key blocks, B*NKV); each CTA owns 64 keys (16 per warp)
//                of one key/value head and walks, for each query head of its group in
//                increasing order, the query blocks at or after them, rebuilding P^T from lse.
//             3. dQ: grid (T/64 query blocks, B*NH); each CTA owns 64 queries and walks the
//                key blocks up to the diagonal, rebuilding P.
//             Every sum has one owner and a fixed order: deterministic, no atomics.
//             S and dP are built twice (7 GEMM-equivalents).
//   fused backward (attention_backward_fused; UNVERIFIED on a GPU, not the default): step 2
//             alone, also forming each step's dQ share dS K from dS^T staged in shared memory
//             and adding it into an fp32 (B, NH, T, HD) workspace in a fixed key-block order
//             (descending) kept by per-query-block semaphores: 5 GEMM-equivalents, no float
//             atomics, deterministic; dK and dV come from the same code as step 2.
//   Registers and spills: `cmake --build BUILD --target remat_ptxas_report` (-Xptxas -v). At
//   sm_90, CUDA 13: fwd 127 / 166 (HD 64 / 128), dK dV 166 / 224, dQ 161 / 181, fused 178 /
//   232, none spilling. Dynamic shared memory: fwd_smem, dkdv_smem, dq_smem below.
// Other cases (fp32, other head dims up to 256): plain fp32 kernels, one warp per row.
//
// Grouped-query attention: qkv rows are [q (NH heads) | k (NKV heads) | v (NKV heads)], row
// width ld = C + 2 NKV HD; query head h reads key/value head h / group (group = NH / NKV).
// NKV == NH is GPT-2's layout (ld = 3C) and runs the same code with group = 1.
//
// Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A (16 x 16): a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B (16 x 8):  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C (16 x 8):  c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..2t+1)
#include <cmath>
#include <type_traits>

#include "kernels/attention.h"
#include "kernels/cuda_common.cuh"

namespace remat::cuda {
namespace {

using bf16 = __nv_bfloat16;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kMaxScalarHD = 256;

template <typename E>
struct AttnParams {
  const E* qkv;      // (B, T, ld): per token [q (C) | k (kv_c) | v (kv_c)], head h at h*HD
  E* out;            // (B, T, C) forward output (read by the backward)
  float* lse;        // (B, NH, T) natural-log log-sum-exp of the scaled scores
  const E* dout;     // (B, T, C) backward: gradient of out
  E* dqkv;           // (B, T, ld) backward: overwritten
  float* D;          // (B, NH, T) backward: rowsum(dout * out)
  int B;             // batch
  int T;             // sequence length
  int C;             // channels of q and out = NH * HD
  int NH;            // query heads
  int NKV;           // key/value heads, NH % NKV == 0
  int group;         // NH / NKV: query heads per key/value head
  int kv_c;          // NKV * HD: channels of k (and of v) per token
  int ld;            // qkv row width C + 2 kv_c
  int HD;            // head dim
  float scale;       // 1 / sqrt(HD)
  float scale_log2;  // scale * log2(e)
  // Fused backward only (attention_backward_fused; null otherwise):
  float* dq_acc;           // (B, NH, T, HD) fp32 partial dQ sums, unscaled (workspace)
  unsigned* dq_sem;        // (B, NH, ceil(T / BQ)) key blocks added into each query block
  unsigned* tile_counter;  // (1) next (head, key block) tile to claim; zero at launch
};

// ------------------------------------------------------------------ PTX wrappers

// Global-scope acquire load and release store (the fused backward's ordering semaphores).
__device__ __forceinline__ unsigned ld_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_release(unsigned* p, unsigned v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// d += a (16 x 16, bf16) * b (16 x 8, bf16), fp32 accumulators.
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                    uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> packed bf16x2 (lo in the low half: the lower column).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// ------------------------------------------------------------------ fragment loads
// Shared tiles are row-major with leading dimension ld (elements), rows padded by 8 elements
// so the 8 row addresses of one ldmatrix phase fall in distinct bank groups.

// A operand (16 x 16) from rows r0.., columns c0.. of a row-major tile.
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const bf16* s, int ld, int r0, int c0,
                                       int lane) {
  ldmatrix_x4(a, s + (r0 + lane % 16) * ld + c0 + (lane / 16) * 8);
}
// B operands of two n8 blocks (n0.., n0+8..) x k16 (k0..) from a tile stored [n][k]:
// b[0], b[1] for block n0; b[2], b[3] for block n0 + 8.
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const bf16* s, int ld, int n0, int k0,
                                          int lane) {
  ldmatrix_x4(b, s + (n0 + (lane / 16) * 8 + lane % 8) * ld + k0 + ((lane / 8) % 2) * 8);
}
// A operand (16 x 16) at rows r0.., columns c0.. of a matrix held transposed: the tile is
// stored [column][row] (transposing load).
__device__ __forceinline__ void load_a_t(uint32_t (&a)[4], const bf16* s, int ld, int r0, int c0,
                                         int lane) {
  ldmatrix_x4_trans(a, s + (c0 + (lane / 16) * 8 + lane % 8) * ld + r0 + ((lane / 8) % 2) * 8);
}
// The same from a tile stored [k][n] (transposing load).
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const bf16* s, int ld, int k0, int n0,
                                          int lane) {
  ldmatrix_x4_trans(b, s + (k0 + ((lane / 8) % 2) * 8 + lane % 8) * ld + n0 + (lane / 16) * 8);
}

// A operand for k-step kk from accumulators acc[n-block][4] (16 rows x 8 columns each):
// columns 16 kk .. 16 kk + 15 are n-blocks 2 kk and 2 kk + 1.
template <int kNB>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[kNB][4], int kk) {
  a[0] = pack_bf16(acc[2 * kk][0], acc[2 * kk][1]);
  a[1] = pack_bf16(acc[2 * kk][2], acc[2 * kk][3]);
  a[2] = pack_bf16(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
  a[3] = pack_bf16(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
}

// Rows row0 .. row0 + kRows - 1 of one head's (T, HD) slice (row stride ld) into a padded
// shared tile, by all threads of the CTA; rows >= T are zero-filled.
template <int kRows, int kHD>
__device__ __forceinline__ void load_tile(bf16* s, const bf16* g, int ld, int row0, int T) {
  constexpr int kChunks = kHD / 8;  // 16-byte chunks per row
  for (int i = threadIdx.x; i < kRows * kChunks; i += blockDim.x) {
    const int r = i / kChunks, c = (i % kChunks) * 8;
    const bool ok = row0 + r < T;
    cp_async16(s + r * (kHD + 8) + c, ok ? g + static_cast<size_t>(row0 + r) * ld + c : g, ok);
  }
}

// Stores accumulator rows (16 x kHD of one warp, scaled) as bf16 to rows row0.. (< T) of a
// (T, HD) slice with row stride ld.
template <int kHD>
__device__ __forceinline__ void store_acc(bf16* g, int ld, const float (&acc)[kHD / 8][4], int row0,
                                          int T, float s0, float s1, int lane) {
  const int gq = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = row0 + gq + half * 8;
    if (row >= T) continue;
    const float s = half == 0 ? s0 : s1;
#pragma unroll
    for (int nd = 0; nd < kHD / 8; ++nd) {
      const uint32_t v = pack_bf16(acc[nd][2 * half] * s, acc[nd][2 * half + 1] * s);
      *reinterpret_cast<uint32_t*>(g + static_cast<size_t>(row) * ld + nd * 8 + 2 * t4) = v;
    }
  }
}

// ------------------------------------------------------------------ tensor-core forward

constexpr int kBM = 64;  // query rows per CTA (16 per warp)
constexpr int kBN = 64;  // keys per tile
constexpr int kWarps = 4;

template <int kHD>
constexpr size_t fwd_smem() {
  return sizeof(bf16) * (kBM + 2 * kBN) * (kHD + 8);
}

template <int kHD>
__global__ void __launch_bounds__(kWarps * 32)
    flash_fwd_kernel(const __grid_constant__ AttnParams<bf16> p) {
  constexpr int kLd = kHD + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // (kBM, kLd)
  bf16* sK = sQ + kBM * kLd;                     // (kBN, kLd)
  bf16* sV = sK + kBN * kLd;                     // (kBN, kLd)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane / 4, t4 = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // longest (latest) query blocks first
  const int b = blockIdx.y / p.NH, h = blockIdx.y % p.NH;
  const int m0 = m_block * kBM, ld = p.ld;
  const bf16* qkv_b = p.qkv + static_cast<size_t>(b) * p.T * ld;
  const bf16* q_g = qkv_b + h * kHD;                             // (T, HD), stride ld
  const bf16* k_g = qkv_b + p.C + (h / p.group) * kHD;           // (T, HD), stride ld
  const bf16* v_g = k_g + p.kv_c;                                // (T, HD), stride ld
  const int n_blocks = min((p.T + kBN - 1) / kBN, m_block + 1);  // causal: keys <= last query

  load_tile<kBM, kHD>(sQ, q_g, ld, m0, p.T);
  load_tile<kBN, kHD>(sK, k_g, ld, 0, p.T);
  cp_async_commit();
  load_tile<kBN, kHD>(sV, v_g, ld, 0, p.T);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();

  uint32_t qf[kHD / 16][4];  // this warp's 16 query rows as A fragments
#pragma unroll
  for (int kk = 0; kk < kHD / 16; ++kk) load_a(qf[kk], sQ, kLd, warp * 16, kk * 16, lane);

  float o[kHD / 8][4] = {};                 // (16, HD) output accumulators
  float m_run[2] = {-INFINITY, -INFINITY};  // running max (log2 units) of rows g, g+8
  float l_run[2] = {0.f, 0.f};              // this thread's share of the running sums
  const int row_base = m0 + warp * 16 + gq;

  for (int j = 0; j < n_blocks; ++j) {
    if (j > 0) {
      cp_async_wait<1>();  // K_j has landed (V_j may be in flight)
      __syncthreads();
    }
    float s[kBN / 8][4] = {};  // (16, kBN) scores
#pragma unroll
    for (int kk = 0; kk < kHD / 16; ++kk) {
#pragma unroll
      for (int nb2 = 0; nb2 < kBN / 16; ++nb2) {
        uint32_t kf[4];
        load_b_nk(kf, sK, kLd, nb2 * 16, kk * 16, lane);
        mma(s[2 * nb2], qf[kk], kf[0], kf[1]);
        mma(s[2 * nb2 + 1], qf[kk], kf[2], kf[3]);
      }
    }
    __syncthreads();  // every warp is done with sK
    if (j + 1 < n_blocks) {
      load_tile<kBN, kHD>(sK, k_g, ld, (j + 1) * kBN, p.T);
      cp_async_commit();
    }
    // Mask (causal and ragged end), then the online softmax update.
    const int n0 = j * kBN;
#pragma unroll
    for (int nb = 0; nb < kBN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row_base + (e / 2) * 8, col = n0 + nb * 8 + 2 * t4 + (e % 2);
        s[nb][e] = (col >= p.T || col > row) ? -INFINITY : s[nb][e] * p.scale_log2;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * r], s[nb][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_run[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // fully masked so far: no NaN
      const float corr = exp2f(m_run[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int nb = 0; nb < kBN / 8; ++nb) {
        s[nb][2 * r] = exp2f(s[nb][2 * r] - m_use);
        s[nb][2 * r + 1] = exp2f(s[nb][2 * r + 1] - m_use);
        sum += s[nb][2 * r] + s[nb][2 * r + 1];
      }
      l_run[r] = l_run[r] * corr + sum;
      m_run[r] = m_new;
#pragma unroll
      for (int nd = 0; nd < kHD / 8; ++nd) {
        o[nd][2 * r] *= corr;
        o[nd][2 * r + 1] *= corr;
      }
    }
    if (j + 1 < n_blocks) {
      cp_async_wait<1>();  // V_j has landed (K_{j+1} may be in flight)
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[4];
      acc_to_a(pa, s, kk);
#pragma unroll
      for (int nd2 = 0; nd2 < kHD / 16; ++nd2) {
        uint32_t vf[4];
        load_b_kn(vf, sV, kLd, kk * 16, nd2 * 16, lane);
        mma(o[2 * nd2], pa, vf[0], vf[1]);
        mma(o[2 * nd2 + 1], pa, vf[2], vf[3]);
      }
    }
    __syncthreads();  // every warp is done with sV
    if (j + 1 < n_blocks) {
      load_tile<kBN, kHD>(sV, v_g, ld, (j + 1) * kBN, p.T);
      cp_async_commit();
    }
  }

  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    inv[r] = 1.f / l;
    const int row = row_base + r * 8;
    if (t4 == 0 && row < p.T)
      p.lse[(static_cast<size_t>(b) * p.NH + h) * p.T + row] = (m_run[r] + log2f(l)) * kLn2;
  }
  store_acc<kHD>(p.out + static_cast<size_t>(b) * p.T * p.C + h * kHD, p.C, o, m0 + warp * 16, p.T,
                 inv[0], inv[1], lane);
}

// ------------------------------------------------------------------ backward, step 1

// D[b, h, t] = sum_d dout * out, one warp per (b, t, h) row.
template <typename T>
__global__ void attn_bwd_dot_kernel(const __grid_constant__ AttnParams<T> p) {
  const int lane = threadIdx.x % 32;
  const long row = static_cast<long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= static_cast<long>(p.B) * p.T * p.NH) return;
  const int h = row % p.NH;
  const long bt = row / p.NH;  // b * T + t
  const T* o = p.out + bt * p.C + h * p.HD;
  const T* g = p.dout + bt * p.C + h * p.HD;
  float acc = 0.f;
  for (int d = lane; d < p.HD; d += 32) acc += to_f32(o[d]) * to_f32(g[d]);
  acc = warp_sum(acc);
  const int b = bt / p.T, t = bt % p.T;
  if (lane == 0) p.D[(static_cast<size_t>(b) * p.NH + h) * p.T + t] = acc;
}

// ------------------------------------------------------------------ tensor-core dK, dV

template <int kHD>
constexpr int bwd_bq() {
  return kHD == 128 ? 32 : 64;  // query rows per step (register budget of the dK, dV CTA)
}
// Fused backward, one step: dQ share (kBQ queries of block i, HD) = dS (kBQ, kBN) K (kBN, HD)
// of key block `key_block`, from sdS (dS^T, [key][query], ld kBQ + 8) and sK, then added to
// query block i of head h in the fixed order (see flash_bwd_dkdv_kernel). Warps tile the
// (kBQ, HD) share as (kBQ / 16) x (4 / (kBQ / 16)): 16 rows x 64 columns each.
template <int kHD, int kBQ>
__device__ __forceinline__ void fused_dq_step(const AttnParams<bf16>& p, const bf16* sdS,
                                              const bf16* sK, int b, int h, int i, int key_block,
                                              int lane, int warp) {
  constexpr int kLd = kHD + 8, kLdS = kBQ + 8;
  constexpr int kWM = kBQ / 16, kWN = kWarps / kWM, kN = kHD / kWN;  // kN = 64
  static_assert(kWM * kWN == kWarps && kN % 16 == 0, "dQ warp tiling");
  const int wm = warp % kWM, wn = warp / kWM, gq = lane / 4, t4 = lane % 4;
  float dq[kN / 8][4] = {};  // (16 queries, kN head dims) of this warp
#pragma unroll
  for (int kk = 0; kk < kBN / 16; ++kk) {
    uint32_t dsa[4];
    load_a_t(dsa, sdS, kLdS, wm * 16, kk * 16, lane);
#pragma unroll
    for (int nd2 = 0; nd2 < kN / 16; ++nd2) {
      uint32_t kb[4];
      load_b_kn(kb, sK, kLd, kk * 16, wn * kN + nd2 * 16, lane);
      mma(dq[2 * nd2], dsa, kb[0], kb[1]);
      mma(dq[2 * nd2 + 1], dsa, kb[2], kb[3]);
    }
  }
  const int last = i * kBQ / kBN;  // first contributor to block i; key block 0 is the final one
  const int n_q_blocks = (p.T + kBQ - 1) / kBQ;
  const size_t bh = static_cast<size_t>(b) * p.NH + h;
  unsigned* sem = p.dq_sem + bh * n_q_blocks + i;
  if (key_block != last) {
    if (threadIdx.x == 0) {
      const unsigned want = static_cast<unsigned>(last - key_block);
      while (ld_acquire(sem) != want) __nanosleep(64);
    }
    __syncthreads();  // the earlier contributions to block i are visible from here
  }
  float* acc = p.dq_acc + bh * p.T * kHD;                               // (T, HD) of head h
  bf16* dq_g = p.dqkv + static_cast<size_t>(b) * p.T * p.ld + h * kHD;  // (T, HD), stride ld
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = i * kBQ + wm * 16 + gq + 8 * r;
    if (row >= p.T) continue;
#pragma unroll
    for (int nd = 0; nd < kN / 8; ++nd) {
      const int col = wn * kN + nd * 8 + 2 * t4;
      float2* a = reinterpret_cast<float2*>(acc + static_cast<size_t>(row) * kHD + col);
      float2 v = make_float2(dq[nd][2 * r], dq[nd][2 * r + 1]);
      if (key_block != last) {
        const float2 prev = __ldcg(a);  // L2: written by another CTA
        v = make_float2(prev.x + v.x, prev.y + v.y);
      }
      if (key_block == 0) {
        *reinterpret_cast<uint32_t*>(dq_g + static_cast<size_t>(row) * p.ld + col) =
            pack_bf16(v.x * p.scale, v.y * p.scale);
      } else {
        __stcg(a, v);
      }
    }
  }
  if (key_block != 0) {  // someone adds after us: publish
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) st_release(sem, static_cast<unsigned>(last - key_block + 1));
  }
}

// K, V; Q, dO double-buffered; fused: dS^T (kBN, kBQ + 8).
template <int kHD, bool kFuseDq>
constexpr size_t dkdv_smem() {
  return sizeof(bf16) *
         ((2 * kBN + 4 * bwd_bq<kHD>()) * (kHD + 8) + (kFuseDq ? kBN * (bwd_bq<kHD>() + 8) : 0));
}

// kFuseDq = false: dK, dV only (dQ by flash_bwd_dq_kernel). Grid (T/64 key blocks, B*NKV).
// kFuseDq = true (UNVERIFIED on a GPU): also dQ. Each step's dS^T goes through shared memory,
// the CTA forms that query block's dQ share dS K (BQ, HD) and adds it to p.dq_acc in a fixed
// order: for query block i, key blocks last(i) = i BQ / BN, last(i) - 1, ..., 0 (descending:
// key block j reaches block i one step after key block j + 1, so the chain rarely waits). The
// first contributor stores, the others load-add-store in fp32, key block 0 writes bf16 dQ to
// dqkv. Order is kept by p.dq_sem[(b, h, i)] = contributions done: key block j waits for
// last(i) - j (acquire), adds, releases last(i) - j + 1. Tiles are claimed from
// p.tile_counter in the order (b, hk) ascending, key block descending, so every tile a CTA
// waits on was claimed earlier by a running CTA: no deadlock whatever the residency.
template <int kHD, bool kFuseDq>
__global__ void __launch_bounds__(kWarps * 32)
    flash_bwd_dkdv_kernel(const __grid_constant__ AttnParams<bf16> p) {
  constexpr int kLd = kHD + 8, kBQ = bwd_bq<kHD>();
  // Head-dim steps of S^T and dP^T unrolled at once: at HD 128 a full unroll lets ptxas hoist
  // enough fragment loads to pass 255 registers and spill (224, no spill, at 2).
  constexpr int kUnrollHD = kHD == 128 ? 2 : kHD / 16;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sK = reinterpret_cast<bf16*>(smem_raw);  // (kBN, kLd)
  bf16* sV = sK + kBN * kLd;                     // (kBN, kLd)
  bf16* sQ = sV + kBN * kLd;                     // (2, kBQ, kLd) double-buffered
  bf16* sdO = sQ + 2 * kBQ * kLd;                // (2, kBQ, kLd)
  constexpr int kLdS = kBQ + 8;
  bf16* sdS = sdO + 2 * kBQ * kLd;  // fused: (kBN, kLdS) dS^T of this step, [key][query]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane / 4, t4 = lane % 4;
  unsigned tile =
      0;  // fused: claimed tile, (b * NKV + hk) * gridDim.x + (last key block - key_block)
  if constexpr (kFuseDq) {
    __shared__ unsigned s_tile;
    if (threadIdx.x == 0) s_tile = atomicAdd(p.tile_counter, 1u);
    __syncthreads();
    tile = s_tile;
  }
  // Unsigned index arithmetic as blockIdx gives it (signed here cost the two-pass HD 64 kernel
  // 16 registers).
  const unsigned key_block = kFuseDq ? gridDim.x - 1 - tile % gridDim.x : blockIdx.x;
  const unsigned bkv = kFuseDq ? tile / gridDim.x : blockIdx.y;  // b * NKV + hk
  const int b = bkv / p.NKV, hk = bkv % p.NKV;                   // key/value head hk
  const int n0 = key_block * kBN, ld = p.ld;
  const bf16* qkv_b = p.qkv + static_cast<size_t>(b) * p.T * ld;
  const bf16* k_g = qkv_b + p.C + hk * kHD;                          // (T, HD), stride ld
  const bf16* v_g = k_g + p.kv_c;                                    // (T, HD), stride ld
  const bf16* dout_b = p.dout + static_cast<size_t>(b) * p.T * p.C;  // head h at h*HD, stride C
  const int i_begin = n0 / kBQ, i_end = (p.T + kBQ - 1) / kBQ;       // causal: queries >= keys
  // Steps walk (query head, query block) pairs: the group's heads h0 .. h0 + group - 1 in
  // order, each over query blocks i_begin .. i_end - 1 in order (the fixed summation order of
  // dK and dV). group = 1 is the plain multi-head walk.
  const int h0 = hk * p.group, steps = p.group * (i_end - i_begin);

  load_tile<kBN, kHD>(sK, k_g, ld, n0, p.T);
  load_tile<kBN, kHD>(sV, v_g, ld, n0, p.T);
  load_tile<kBQ, kHD>(sQ, qkv_b + h0 * kHD, ld, i_begin * kBQ, p.T);
  load_tile<kBQ, kHD>(sdO, dout_b + h0 * kHD, p.C, i_begin * kBQ, p.T);
  cp_async_commit();

  float dk[kHD / 8][4] = {}, dv[kHD / 8][4] = {};  // (16 keys, HD) of this warp
  const int key_base = n0 + warp * 16 + gq;        // key of accumulator rows g (and g + 8)

  int h = h0, i = i_begin;  // this step's query head and query block
  for (int step = 0; step < steps; ++step) {
    const int buf = step & 1;
    int h_next = h, i_next = i + 1;
    if (i_next == i_end) {
      i_next = i_begin;
      ++h_next;
    }
    if (step + 1 < steps) {
      load_tile<kBQ, kHD>(sQ + (buf ^ 1) * kBQ * kLd, qkv_b + h_next * kHD, ld, i_next * kBQ, p.T);
      load_tile<kBQ, kHD>(sdO + (buf ^ 1) * kBQ * kLd, dout_b + h_next * kHD, p.C, i_next * kBQ,
                          p.T);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* q_s = sQ + buf * kBQ * kLd;
    const bf16* do_s = sdO + buf * kBQ * kLd;
    const int q0 = i * kBQ;
    const float* lse = p.lse + (static_cast<size_t>(b) * p.NH + h) * p.T;  // (T) of head h
    const float* Dg = p.D + (static_cast<size_t>(b) * p.NH + h) * p.T;     // (T) of head h

    // S^T = K Q^T and dP^T = V dO^T: (16 keys, kBQ queries) each. Two loops, not one: only
    // one product's fragments are live at a time (HD 128 spilled with both). Each
    // accumulator sees the same mma sequence either way, so the results are unchanged.
    float st[kBQ / 8][4] = {}, dpt[kBQ / 8][4] = {};
#pragma unroll(kUnrollHD)
    for (int kk = 0; kk < kHD / 16; ++kk) {
      uint32_t ka[4];
      load_a(ka, sK, kLd, warp * 16, kk * 16, lane);
#pragma unroll
      for (int nq2 = 0; nq2 < kBQ / 16; ++nq2) {
        uint32_t qb[4];
        load_b_nk(qb, q_s, kLd, nq2 * 16, kk * 16, lane);
        mma(st[2 * nq2], ka, qb[0], qb[1]);
        mma(st[2 * nq2 + 1], ka, qb[2], qb[3]);
      }
    }
#pragma unroll(kUnrollHD)
    for (int kk = 0; kk < kHD / 16; ++kk) {
      uint32_t va[4];
      load_a(va, sV, kLd, warp * 16, kk * 16, lane);
#pragma unroll
      for (int nq2 = 0; nq2 < kBQ / 16; ++nq2) {
        uint32_t ob[4];
        load_b_nk(ob, do_s, kLd, nq2 * 16, kk * 16, lane);
        mma(dpt[2 * nq2], va, ob[0], ob[1]);
        mma(dpt[2 * nq2 + 1], va, ob[2], ob[3]);
      }
    }
    // P^T = exp(scale S^T - lse[query]) (0 where masked); dS^T = P^T (dP^T - D[query]).
#pragma unroll
    for (int nq = 0; nq < kBQ / 8; ++nq) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int query = q0 + nq * 8 + 2 * t4 + c;
        const bool qok = query < p.T;
        const float lse2 = qok ? lse[query] * kLog2e : 0.f;
        const float Dq = qok ? Dg[query] : 0.f;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int key = key_base + r * 8;
          const int e = 2 * r + c;
          const float pv = (qok && query >= key) ? exp2f(st[nq][e] * p.scale_log2 - lse2) : 0.f;
          st[nq][e] = pv;
          dpt[nq][e] = pv * (dpt[nq][e] - Dq);
        }
      }
    }
    if constexpr (kFuseDq) {  // dS^T as bf16 (the same rounding the dK product applies)
#pragma unroll
      for (int nq = 0; nq < kBQ / 8; ++nq) {
#pragma unroll
        for (int r = 0; r < 2; ++r)
          *reinterpret_cast<uint32_t*>(sdS + (warp * 16 + gq + 8 * r) * kLdS + nq * 8 + 2 * t4) =
              pack_bf16(dpt[nq][2 * r], dpt[nq][2 * r + 1]);
      }
    }
    // dV += P^T dO, then dK += dS^T Q: k-dimension = queries (split like S^T and dP^T).
#pragma unroll
    for (int kk = 0; kk < kBQ / 16; ++kk) {
      uint32_t pa[4];
      acc_to_a(pa, st, kk);
#pragma unroll
      for (int nd2 = 0; nd2 < kHD / 16; ++nd2) {
        uint32_t ob[4];
        load_b_kn(ob, do_s, kLd, kk * 16, nd2 * 16, lane);
        mma(dv[2 * nd2], pa, ob[0], ob[1]);
        mma(dv[2 * nd2 + 1], pa, ob[2], ob[3]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < kBQ / 16; ++kk) {
      uint32_t dsa[4];
      acc_to_a(dsa, dpt, kk);
#pragma unroll
      for (int nd2 = 0; nd2 < kHD / 16; ++nd2) {
        uint32_t qb[4];
        load_b_kn(qb, q_s, kLd, kk * 16, nd2 * 16, lane);
        mma(dk[2 * nd2], dsa, qb[0], qb[1]);
        mma(dk[2 * nd2 + 1], dsa, qb[2], qb[3]);
      }
    }
    if constexpr (kFuseDq) {
      __syncthreads();  // sdS complete
      fused_dq_step<kHD, kBQ>(p, sdS, sK, b, h, i, key_block, lane, warp);
    }
    __syncthreads();  // buffer `buf` (and sdS) is refilled from the next step on
    h = h_next;
    i = i_next;
  }
  bf16* dk_g = p.dqkv + static_cast<size_t>(b) * p.T * ld + p.C + hk * kHD;
  store_acc<kHD>(dk_g, ld, dk, n0 + warp * 16, p.T, p.scale, p.scale, lane);
  store_acc<kHD>(dk_g + p.kv_c, ld, dv, n0 + warp * 16, p.T, 1.f, 1.f, lane);
}

// ------------------------------------------------------------------ tensor-core dQ

template <int kHD>
constexpr size_t dq_smem() {
  return sizeof(bf16) * (2 * kBM + 4 * kBN) * (kHD + 8);
}

template <int kHD>
__global__ void __launch_bounds__(kWarps * 32)
    flash_bwd_dq_kernel(const __grid_constant__ AttnParams<bf16> p) {
  constexpr int kLd = kHD + 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* sQ = reinterpret_cast<bf16*>(smem_raw);  // (kBM, kLd)
  bf16* sdO = sQ + kBM * kLd;                    // (kBM, kLd)
  bf16* sK = sdO + kBM * kLd;                    // (2, kBN, kLd) double-buffered
  bf16* sV = sK + 2 * kBN * kLd;                 // (2, kBN, kLd)
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, gq = lane / 4, t4 = lane % 4;
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int b = blockIdx.y / p.NH, h = blockIdx.y % p.NH;
  const int m0 = m_block * kBM, ld = p.ld;
  const bf16* qkv_b = p.qkv + static_cast<size_t>(b) * p.T * ld;
  const bf16* q_g = qkv_b + h * kHD;                    // (T, HD), stride ld
  const bf16* k_g = qkv_b + p.C + (h / p.group) * kHD;  // (T, HD), stride ld
  const bf16* v_g = k_g + p.kv_c;                       // (T, HD), stride ld
  const bf16* do_g = p.dout + static_cast<size_t>(b) * p.T * p.C + h * kHD;
  const float* lse = p.lse + (static_cast<size_t>(b) * p.NH + h) * p.T;
  const float* Dg = p.D + (static_cast<size_t>(b) * p.NH + h) * p.T;
  const int n_blocks = min((p.T + kBN - 1) / kBN, m_block + 1);

  load_tile<kBM, kHD>(sQ, q_g, ld, m0, p.T);
  load_tile<kBM, kHD>(sdO, do_g, p.C, m0, p.T);
  load_tile<kBN, kHD>(sK, k_g, ld, 0, p.T);
  load_tile<kBN, kHD>(sV, v_g, ld, 0, p.T);
  cp_async_commit();

  const int row_base = m0 + warp * 16 + gq;
  float lse2[2], Drow[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row_base + r * 8;
    lse2[r] = row < p.T ? lse[row] * kLog2e : 0.f;
    Drow[r] = row < p.T ? Dg[row] : 0.f;
  }
  float dq[kHD / 8][4] = {};

  for (int j = 0; j < n_blocks; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_blocks) {
      load_tile<kBN, kHD>(sK + (buf ^ 1) * kBN * kLd, k_g, ld, (j + 1) * kBN, p.T);
      load_tile<kBN, kHD>(sV + (buf ^ 1) * kBN * kLd, v_g, ld, (j + 1) * kBN, p.T);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const bf16* k_s = sK + buf * kBN * kLd;
    const bf16* v_s = sV + buf * kBN * kLd;

    // S = Q K^T and dP = dO V^T: (16 queries, kBN keys).
    float s[kBN / 8][4] = {}, dp[kBN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kHD / 16; ++kk) {
      uint32_t qa[4], oa[4];
      load_a(qa, sQ, kLd, warp * 16, kk * 16, lane);
      load_a(oa, sdO, kLd, warp * 16, kk * 16, lane);
#pragma unroll
      for (int nb2 = 0; nb2 < kBN / 16; ++nb2) {
        uint32_t kb[4], vb[4];
        load_b_nk(kb, k_s, kLd, nb2 * 16, kk * 16, lane);
        load_b_nk(vb, v_s, kLd, nb2 * 16, kk * 16, lane);
        mma(s[2 * nb2], qa, kb[0], kb[1]);
        mma(s[2 * nb2 + 1], qa, kb[2], kb[3]);
        mma(dp[2 * nb2], oa, vb[0], vb[1]);
        mma(dp[2 * nb2 + 1], oa, vb[2], vb[3]);
      }
    }
    const int n0 = j * kBN;
#pragma unroll
    for (int nb = 0; nb < kBN / 8; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e / 2, row = row_base + r * 8, col = n0 + nb * 8 + 2 * t4 + (e % 2);
        const float pv =
            (col < p.T && col <= row && row < p.T) ? exp2f(s[nb][e] * p.scale_log2 - lse2[r]) : 0.f;
        s[nb][e] = pv * (dp[nb][e] - Drow[r]);  // dS
      }
    }
    // dQ += dS K: k-dimension = keys.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t dsa[4];
      acc_to_a(dsa, s, kk);
#pragma unroll
      for (int nd2 = 0; nd2 < kHD / 16; ++nd2) {
        uint32_t kb[4];
        load_b_kn(kb, k_s, kLd, kk * 16, nd2 * 16, lane);
        mma(dq[2 * nd2], dsa, kb[0], kb[1]);
        mma(dq[2 * nd2 + 1], dsa, kb[2], kb[3]);
      }
    }
    __syncthreads();  // buffer `buf` is refilled two steps from now
  }
  store_acc<kHD>(p.dqkv + static_cast<size_t>(b) * p.T * ld + h * kHD, ld, dq, m0 + warp * 16, p.T,
                 p.scale, p.scale, lane);
}

// ------------------------------------------------------------------ plain fp32 kernels
// One warp per row; lane l owns channels l, l + 32, ... (at most kMaxScalarHD / 32 each).
// Each lane scores one key (or query) of a chunk of 32; the chunk's values are then
// broadcast with shuffles. The row being processed is staged in shared memory (fp32).

constexpr int kScalarWarps = 4;
constexpr int kPer = kMaxScalarHD / 32;

template <typename T>
__device__ __forceinline__ float dot_row(const float* a, const T* b, int HD) {
  float acc = 0.f;
  for (int d = 0; d < HD; ++d) acc += a[d] * to_f32(b[d]);
  return acc;
}

// Grid (ceil(T / 4), B*NH); smem (4, HD) floats.
template <typename T>
__global__ void attn_fwd_scalar_kernel(const __grid_constant__ AttnParams<T> p) {
  extern __shared__ float sq[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int t = blockIdx.x * kScalarWarps + warp;
  if (t >= p.T) return;
  const int b = blockIdx.y / p.NH, h = blockIdx.y % p.NH, ld = p.ld;
  const T* qkv_b = p.qkv + static_cast<size_t>(b) * p.T * ld;
  const T* base = qkv_b + h * p.HD;                     // q of head h, stride ld
  const T* kbase = qkv_b + p.C + (h / p.group) * p.HD;  // k of its kv head, stride ld
  const T* vbase = kbase + p.kv_c;                      // v of its kv head, stride ld
  float* q = sq + warp * p.HD;
  for (int d = lane; d < p.HD; d += 32) q[d] = to_f32(base[static_cast<size_t>(t) * ld + d]);
  __syncwarp();
  float m = -INFINITY, l = 0.f, o[kPer] = {};
  for (int j0 = 0; j0 <= t; j0 += 32) {
    const int j = j0 + lane;
    const float sc =
        j <= t ? dot_row(q, kbase + static_cast<size_t>(j) * ld, p.HD) * p.scale : -INFINITY;
    const float m_new = fmaxf(m, warp_max(sc));
    const float corr = expf(m - m_new);
    const float pj = j <= t ? expf(sc - m_new) : 0.f;
    l = l * corr + warp_sum(pj);
    m = m_new;
#pragma unroll
    for (int k = 0; k < kPer; ++k) o[k] *= corr;
    const int cnt = min(32, t + 1 - j0);
    for (int jj = 0; jj < cnt; ++jj) {
      const float pb = __shfl_sync(0xffffffffu, pj, jj);
      const T* v = vbase + static_cast<size_t>(j0 + jj) * ld;
#pragma unroll
      for (int k = 0; k < kPer; ++k)
        if (lane + 32 * k < p.HD) o[k] += pb * to_f32(v[lane + 32 * k]);
    }
  }
  T* out = p.out + (static_cast<size_t>(b) * p.T + t) * p.C + h * p.HD;
#pragma unroll
  for (int k = 0; k < kPer; ++k)
    if (lane + 32 * k < p.HD) out[lane + 32 * k] = from_f32<T>(o[k] / l);
  if (lane == 0) p.lse[(static_cast<size_t>(b) * p.NH + h) * p.T + t] = m + logf(l);
}

// dQ: one warp per query row t. Grid (ceil(T / 4), B*NH); smem (4, 2, HD) floats.
template <typename T>
__global__ void attn_dq_scalar_kernel(const __grid_constant__ AttnParams<T> p) {
  extern __shared__ float sh[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int t = blockIdx.x * kScalarWarps + warp;
  if (t >= p.T) return;
  const int b = blockIdx.y / p.NH, h = blockIdx.y % p.NH, ld = p.ld;
  const T* qkv_b = p.qkv + static_cast<size_t>(b) * p.T * ld;
  const T* base = qkv_b + h * p.HD;                     // q of head h, stride ld
  const T* kbase = qkv_b + p.C + (h / p.group) * p.HD;  // k of its kv head, stride ld
  const T* vbase = kbase + p.kv_c;                      // v of its kv head, stride ld
  const T* go = p.dout + (static_cast<size_t>(b) * p.T + t) * p.C + h * p.HD;
  float* q = sh + warp * 2 * p.HD;
  float* g = q + p.HD;
  for (int d = lane; d < p.HD; d += 32) {
    q[d] = to_f32(base[static_cast<size_t>(t) * ld + d]);
    g[d] = to_f32(go[d]);
  }
  __syncwarp();
  const size_t row = (static_cast<size_t>(b) * p.NH + h) * p.T + t;
  const float lse = p.lse[row], Dt = p.D[row];
  float dq[kPer] = {};
  for (int j0 = 0; j0 <= t; j0 += 32) {
    const int j = j0 + lane;
    float ds = 0.f;
    if (j <= t) {
      const T* kr = kbase + static_cast<size_t>(j) * ld;
      const float pj = expf(dot_row(q, kr, p.HD) * p.scale - lse);
      ds = pj * (dot_row(g, vbase + static_cast<size_t>(j) * ld, p.HD) - Dt);
    }
    const int cnt = min(32, t + 1 - j0);
    for (int jj = 0; jj < cnt; ++jj) {
      const float db = __shfl_sync(0xffffffffu, ds, jj);
      const T* kr = kbase + static_cast<size_t>(j0 + jj) * ld;
#pragma unroll
      for (int k = 0; k < kPer; ++k)
        if (lane + 32 * k < p.HD) dq[k] += db * to_f32(kr[lane + 32 * k]);
    }
  }
  T* dst = p.dqkv + (static_cast<size_t>(b) * p.T + t) * ld + h * p.HD;
#pragma unroll
  for (int k = 0; k < kPer; ++k)
    if (lane + 32 * k < p.HD) dst[lane + 32 * k] = from_f32<T>(dq[k] * p.scale);
}

// dK, dV: one warp per key row j of key/value head hk, summing the group's query heads in
// increasing order. Grid (ceil(T / 4), B*NKV); smem (4, 2, HD) floats.
template <typename T>
__global__ void attn_dkdv_scalar_kernel(const __grid_constant__ AttnParams<T> p) {
  extern __shared__ float sh[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int j = blockIdx.x * kScalarWarps + warp;
  if (j >= p.T) return;
  const int b = blockIdx.y / p.NKV, hk = blockIdx.y % p.NKV, ld = p.ld;
  const T* qkv_b = p.qkv + static_cast<size_t>(b) * p.T * ld;
  const T* kbase = qkv_b + p.C + hk * p.HD;  // k of head hk, stride ld
  const T* vbase = kbase + p.kv_c;           // v of head hk, stride ld
  float* kj = sh + warp * 2 * p.HD;
  float* vj = kj + p.HD;
  for (int d = lane; d < p.HD; d += 32) {
    kj[d] = to_f32(kbase[static_cast<size_t>(j) * ld + d]);
    vj[d] = to_f32(vbase[static_cast<size_t>(j) * ld + d]);
  }
  __syncwarp();
  float dk[kPer] = {}, dv[kPer] = {};
  for (int h = hk * p.group; h < (hk + 1) * p.group; ++h) {
    const T* base = qkv_b + h * p.HD;                                         // q, stride ld
    const T* gbase = p.dout + static_cast<size_t>(b) * p.T * p.C + h * p.HD;  // dout, stride C
    const size_t stat = (static_cast<size_t>(b) * p.NH + h) * p.T;
    for (int t0 = j; t0 < p.T; t0 += 32) {
      const int t = t0 + lane;
      float pt = 0.f, ds = 0.f;
      if (t < p.T) {
        pt =
            expf(dot_row(kj, base + static_cast<size_t>(t) * ld, p.HD) * p.scale - p.lse[stat + t]);
        ds = pt * (dot_row(vj, gbase + static_cast<size_t>(t) * p.C, p.HD) - p.D[stat + t]);
      }
      const int cnt = min(32, p.T - t0);
      for (int tt = 0; tt < cnt; ++tt) {
        const float pb = __shfl_sync(0xffffffffu, pt, tt);
        const float db = __shfl_sync(0xffffffffu, ds, tt);
        const T* qr = base + static_cast<size_t>(t0 + tt) * ld;
        const T* gr = gbase + static_cast<size_t>(t0 + tt) * p.C;
#pragma unroll
        for (int k = 0; k < kPer; ++k) {
          const int d = lane + 32 * k;
          if (d < p.HD) {
            dv[k] += pb * to_f32(gr[d]);
            dk[k] += db * to_f32(qr[d]);
          }
        }
      }
    }
  }
  T* dst = p.dqkv + (static_cast<size_t>(b) * p.T + j) * ld + p.C + hk * p.HD;
#pragma unroll
  for (int k = 0; k < kPer; ++k) {
    const int d = lane + 32 * k;
    if (d < p.HD) {
      dst[d] = from_f32<T>(dk[k] * p.scale);
      dst[p.kv_c + d] = from_f32<T>(dv[k]);
    }
  }
}

// ------------------------------------------------------------------ launch

// Raises a kernel's dynamic shared memory limit (once per process and kernel: one device).
template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    REMAT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(bytes)));
}

template <typename E>
AttnParams<E> make_params(const char* who, int B, int T, int C, int NH, int NKV) {
  if (NKV == 0) NKV = NH;
  REMAT_CHECK(B >= 0 && T >= 0 && C > 0 && NH > 0 && C % NH == 0 && NKV > 0 && NH % NKV == 0,
              std::string(who) + ": bad shape B=" + std::to_string(B) + " T=" + std::to_string(T) +
                  " C=" + std::to_string(C) + " NH=" + std::to_string(NH) +
                  " NKV=" + std::to_string(NKV) + " (need C % NH == 0 and NH % NKV == 0)");
  const int HD = C / NH;
  REMAT_CHECK(HD <= kMaxScalarHD || (std::is_same_v<E, bf16> && (HD == 64 || HD == 128)),
              std::string(who) + ": head dim " + std::to_string(HD) + " unsupported (<= 256)");
  AttnParams<E> p{};
  p.B = B;
  p.T = T;
  p.C = C;
  p.NH = NH;
  p.NKV = NKV;
  p.group = NH / NKV;
  p.kv_c = NKV * HD;
  p.ld = C + 2 * p.kv_c;
  p.HD = HD;
  p.scale = 1.0f / std::sqrt(static_cast<float>(HD));
  p.scale_log2 = p.scale * kLog2e;
  return p;
}

template <typename T>
bool use_tensor_cores(const AttnParams<T>& p) {
  return std::is_same_v<T, bf16> && (p.HD == 64 || p.HD == 128);
}

template <int kHD>
void launch_fwd_tc(const AttnParams<bf16>& p, cudaStream_t stream) {
  static const bool smem_set = (set_smem(flash_fwd_kernel<kHD>, fwd_smem<kHD>()), true);
  (void)smem_set;
  flash_fwd_kernel<kHD>
      <<<dim3(ceil_div(p.T, kBM), p.B * p.NH), kWarps * 32, fwd_smem<kHD>(), stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

template <int kHD>
void launch_bwd_tc(const AttnParams<bf16>& p, cudaStream_t stream) {
  static const bool smem_set =
      (set_smem(flash_bwd_dkdv_kernel<kHD, false>, dkdv_smem<kHD, false>()),
       set_smem(flash_bwd_dq_kernel<kHD>, dq_smem<kHD>()), true);
  (void)smem_set;
  flash_bwd_dkdv_kernel<kHD, false>
      <<<dim3(ceil_div(p.T, kBN), p.B * p.NKV), kWarps * 32, dkdv_smem<kHD, false>(), stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
  flash_bwd_dq_kernel<kHD>
      <<<dim3(ceil_div(p.T, kBM), p.B * p.NH), kWarps * 32, dq_smem<kHD>(), stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

// The fused backward (UNVERIFIED): one kernel for dK, dV and dQ. p.dq_sem and p.tile_counter
// (contiguous) are zeroed on `stream` first; p.dq_acc needs no clearing (each query block's
// first contributor stores).
template <int kHD>
void launch_bwd_fused_tc(const AttnParams<bf16>& p, size_t sem_count, cudaStream_t stream) {
  static const bool smem_set =
      (set_smem(flash_bwd_dkdv_kernel<kHD, true>, dkdv_smem<kHD, true>()), true);
  (void)smem_set;
  REMAT_CUDA_CHECK(cudaMemsetAsync(p.dq_sem, 0, (sem_count + 1) * sizeof(unsigned), stream));
  flash_bwd_dkdv_kernel<kHD, true>
      <<<dim3(ceil_div(p.T, kBN), p.B * p.NKV), kWarps * 32, dkdv_smem<kHD, true>(), stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

// Fused workspace, in floats: [D (B NH T), padded to 4][dq_acc (B NH T HD)][dq_sem (B NH
// ceil(T / 32)), an upper bound for every BQ][tile_counter (1)].
struct FusedWorkspace {
  size_t d_floats, acc_floats, sem_count;
  size_t total() const { return d_floats + acc_floats + sem_count + 1; }
};
FusedWorkspace fused_workspace(int B, int T, int C, int NH) {
  const size_t bht = static_cast<size_t>(B) * NH * T;
  return {(bht + 3) / 4 * 4, static_cast<size_t>(B) * T * C,
          static_cast<size_t>(B) * NH * ceil_div(T, 32)};
}

}  // namespace

template <typename Elem>
void attention_forward(Elem* out, float* lse, const Elem* qkv, int B, int T, int C, int NH,
                       cudaStream_t stream, int NKV) {
  AttnParams<Elem> p = make_params<Elem>("attention_forward", B, T, C, NH, NKV);
  if (B == 0 || T == 0) return;
  REMAT_CHECK(out && lse && qkv, "attention_forward: null pointer");
  NvtxRange range("attention_forward");
  p.qkv = qkv;
  p.out = out;
  p.lse = lse;
  if constexpr (std::is_same_v<Elem, bf16>) {
    if (use_tensor_cores(p)) {
      REMAT_CHECK(aligned16(qkv), "attention_forward: qkv must be 16-byte aligned");
      if (p.HD == 64) {
        launch_fwd_tc<64>(p, stream);
      } else {
        launch_fwd_tc<128>(p, stream);
      }
      return;
    }
  }
  attn_fwd_scalar_kernel<Elem><<<dim3(ceil_div(T, kScalarWarps), B * NH), kScalarWarps * 32,
                                 kScalarWarps * p.HD * sizeof(float), stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

size_t attention_backward_workspace_floats(int B, int T, int NH) {
  return static_cast<size_t>(B) * T * NH;
}

template <typename Elem>
void attention_backward(Elem* dqkv, const Elem* dout, const Elem* qkv, const Elem* out,
                        const float* lse, int B, int T, int C, int NH, float* workspace,
                        cudaStream_t stream, int NKV) {
  AttnParams<Elem> p = make_params<Elem>("attention_backward", B, T, C, NH, NKV);
  if (B == 0 || T == 0) return;
  REMAT_CHECK(dqkv && dout && qkv && out && lse && workspace, "attention_backward: null pointer");
  NvtxRange range("attention_backward");
  p.qkv = qkv;
  p.out = const_cast<Elem*>(out);  // read only in the backward
  p.lse = const_cast<float*>(lse);
  p.dout = dout;
  p.dqkv = dqkv;
  p.D = workspace;
  const long rows = static_cast<long>(B) * T * NH;
  attn_bwd_dot_kernel<Elem><<<ceil_div(rows, 8), 256, 0, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
  if constexpr (std::is_same_v<Elem, bf16>) {
    if (use_tensor_cores(p)) {
      REMAT_CHECK(aligned16(qkv) && aligned16(dout) && aligned16(dqkv),
                  "attention_backward: pointers must be 16-byte aligned");
      if (p.HD == 64) {
        launch_bwd_tc<64>(p, stream);
      } else {
        launch_bwd_tc<128>(p, stream);
      }
      return;
    }
  }
  const dim3 grid(ceil_div(T, kScalarWarps), B * NH), kv_grid(grid.x, B * p.NKV);
  const size_t smem = kScalarWarps * 2 * p.HD * sizeof(float);
  attn_dq_scalar_kernel<Elem><<<grid, kScalarWarps * 32, smem, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
  attn_dkdv_scalar_kernel<Elem><<<kv_grid, kScalarWarps * 32, smem, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

size_t attention_backward_fused_workspace_floats(int B, int T, int C, int NH) {
  return fused_workspace(B, T, C, NH).total();
}

template <typename Elem>
void attention_backward_fused(Elem* dqkv, const Elem* dout, const Elem* qkv, const Elem* out,
                              const float* lse, int B, int T, int C, int NH, float* workspace,
                              cudaStream_t stream, int NKV) {
  if constexpr (std::is_same_v<Elem, bf16>) {
    AttnParams<Elem> p = make_params<Elem>("attention_backward_fused", B, T, C, NH, NKV);
    if (B == 0 || T == 0) return;
    if (use_tensor_cores(p)) {
      REMAT_CHECK(dqkv && dout && qkv && out && lse && workspace,
                  "attention_backward_fused: null pointer");
      REMAT_CHECK(aligned16(qkv) && aligned16(dout) && aligned16(dqkv) && aligned16(workspace),
                  "attention_backward_fused: pointers must be 16-byte aligned");
      NvtxRange range("attention_backward_fused");
      const FusedWorkspace w = fused_workspace(B, T, C, NH);
      p.qkv = qkv;
      p.out = const_cast<Elem*>(out);  // read only in the backward
      p.lse = const_cast<float*>(lse);
      p.dout = dout;
      p.dqkv = dqkv;
      p.D = workspace;
      p.dq_acc = workspace + w.d_floats;
      p.dq_sem = reinterpret_cast<unsigned*>(p.dq_acc + w.acc_floats);
      p.tile_counter = p.dq_sem + w.sem_count;
      const long rows = static_cast<long>(B) * T * NH;
      attn_bwd_dot_kernel<Elem><<<ceil_div(rows, 8), 256, 0, stream>>>(p);
      REMAT_CUDA_LAUNCH_CHECK(stream);
      if (p.HD == 64) {
        launch_bwd_fused_tc<64>(p, w.sem_count, stream);
      } else {
        launch_bwd_fused_tc<128>(p, w.sem_count, stream);
      }
      return;
    }
  }
  // No fused kernel here (fp32, other head dims): the two-pass backward, D at the start.
  attention_backward(dqkv, dout, qkv, out, lse, B, T, C, NH, workspace, stream, NKV);
}

template void attention_forward<float>(float*, float*, const float*, int, int, int, int,
                                       cudaStream_t, int);
template void attention_forward<bf16>(bf16*, float*, const bf16*, int, int, int, int, cudaStream_t,
                                      int);
template void attention_backward<float>(float*, const float*, const float*, const float*,
                                        const float*, int, int, int, int, float*, cudaStream_t,
                                        int);
template void attention_backward<bf16>(bf16*, const bf16*, const bf16*, const bf16*, const float*,
                                       int, int, int, int, float*, cudaStream_t, int);
template void attention_backward_fused<float>(float*, const float*, const float*, const float*,
                                              const float*, int, int, int, int, float*,
                                              cudaStream_t, int);
template void attention_backward_fused<bf16>(bf16*, const bf16*, const bf16*, const bf16*,
                                             const float*, int, int, int, int, float*, cudaStream_t,
                                             int);

}  // namespace remat::cuda
