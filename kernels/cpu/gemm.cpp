// CPU sgemm: packed panels, a 6x16 register-tiled micro-kernel, OpenMP over tiles of C.
//
// Loop nest (BLIS order): jc over column panels of kNC, pc over K in blocks of kKC, pack
// op(B)(pc:pc+kc, jc:jc+nc) once per (jc, pc) with all threads, then the threads share the
// (row block, column block) tasks of that panel; each task packs its rows of op(A) and runs
// the micro-kernel over kMR x kNR tiles. Each element of C is therefore summed as: per kKC
// block, an FMA chain over k ascending starting from 0; blocks folded into C in pc order.
// Nothing in that order depends on the thread count, the row or column blocking of the
// tasks, or the calling thread, so results are bitwise reproducible.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#ifdef __AVX__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/common.h"
#include "kernels/gemm.h"

namespace remat::cpu {
namespace {

// Register tile of C: kMR rows x kNR columns (12 AVX2 vectors of 8 floats).
constexpr int kMR = 6;
constexpr int kNR = 16;
// Depth of a packed panel. The only blocking size that affects results: keep it fixed.
constexpr int kKC = 256;
// Most rows of op(A) per packed block (kMCMax x kKC floats, L2 resident).
constexpr int kMCMax = 144;
// Columns of op(B) per packed panel (kKC x kNC floats, L3 resident).
constexpr int kNC = 4080;
// Target columns per parallel task inside a panel.
constexpr int kNTask = 384;
// Micro-panels of op(B) packed together by one thread.
constexpr int kPackGroup = 8;
// Below this many flops one thread does the whole product.
constexpr double kParallelFlops = 1 << 21;

typedef float v8f __attribute__((vector_size(32)));

std::atomic<bool> g_naive{false};

int ceil_div(int a, int b) {
  return (a + b - 1) / b;
}
int round_up(int a, int b) {
  return ceil_div(a, b) * b;
}

// Block size <= max_block (rounded up to unit) that splits n into equal-ish blocks.
int balanced_block(int n, int max_block, int unit) {
  const int nblocks = ceil_div(n, max_block);
  return round_up(ceil_div(n, nblocks), unit);
}

#ifdef _OPENMP
int max_team_size() {
  return omp_get_max_threads();
}
int team_rank() {
  return omp_get_thread_num();
}
#else
int max_team_size() {
  return 1;
}
int team_rank() {
  return 0;
}
#endif

// Grow-only 64-byte aligned scratch for packed panels. Each calling thread owns one pair (so
// concurrent sgemm calls from different threads never share), allocated before the parallel
// region so that an allocation failure throws in the caller.
struct ScratchBuffer {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float[], Free> data;
  size_t size = 0;

  float* get(size_t n) {
    if (n > size) {
      const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
      float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
      REMAT_CHECK(p != nullptr, "sgemm: out of memory for packing buffers");
      data.reset(p);
      size = n;
    }
    return data.get();
  }
};

struct PackBuffers {
  ScratchBuffer a;  // one A block per team member
  ScratchBuffer b;  // the shared B panel
};

PackBuffers& pack_buffers() {
  thread_local PackBuffers bufs;
  return bufs;
}

// Strides of op(X)(r, c) = X[r * rs + c * cs] for a row-major X with leading dimension ld.
struct View {
  const float* p;
  long rs;  // stride between rows of op(X)
  long cs;  // stride between columns of op(X)
  float at(long r, long c) const { return p[r * rs + c * cs]; }
};

View make_view(Trans t, const float* p, int ld) {
  return t == Trans::kNo ? View{p, ld, 1} : View{p, 1, ld};
}

// Packs op(A)(i0:i0+mc, p0:p0+kc) into micro-panels of kMR rows: dst[(panel * kc + k) * kMR + i],
// rows past mc are zero.
__attribute__((noinline)) void pack_a(float* dst, View a, int i0, int mc, int p0, int kc) {
  for (int ip = 0; ip < mc; ip += kMR) {
    const int mr = std::min(kMR, mc - ip);
    float* d = dst + static_cast<long>(ip) * kc;
    if (a.cs == 1) {
      // op(A) rows are contiguous: gather kMR row streams.
      for (int i = 0; i < kMR; ++i) {
        if (i < mr) {
          const float* src = a.p + (i0 + ip + i) * a.rs + p0;
          for (int k = 0; k < kc; ++k) d[k * kMR + i] = src[k];
        } else {
          for (int k = 0; k < kc; ++k) d[k * kMR + i] = 0.0f;
        }
      }
    } else {
      // op(A) columns are contiguous: copy kMR consecutive floats per k.
      for (int k = 0; k < kc; ++k) {
        const float* src = a.p + (p0 + k) * a.cs + (i0 + ip);
        for (int i = 0; i < kMR; ++i) d[k * kMR + i] = i < mr ? src[i] : 0.0f;
      }
    }
  }
}

#ifdef __AVX__
// dst[c * ldd + r] = src[r * lds + c] for an 8 x 8 block.
inline void transpose8x8_store(const float* src, long lds, float* dst, long ldd) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);      // r_i[0] r_i+1[0] r_i[1] r_i+1[1] | [4] [5]
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // [2] [3] | [6] [7]
  }
  __m256 u[8];
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));          // column 0 | 4
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));      // column 1 | 5
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));  // 2 | 6
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));  // 3 | 7
  }
  for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + c * ldd, _mm256_permute2f128_ps(u[c], u[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ldd, _mm256_permute2f128_ps(u[c], u[c + 4], 0x31));
  }
}
#endif

// Packs micro-panels jp0..jp1-1 of op(B)(p0:p0+kc, j0:j0+nc): panel jp holds columns
// j0 + jp*kNR .. +kNR as dst[(jp * kc + k) * kNR + j]; columns past nc are zero.
__attribute__((noinline)) void pack_b_panels(float* dst, View b, int j0, int nc, int jp0, int jp1,
                                             int p0, int kc) {
  if (b.cs == 1) {
    // op(B) rows are contiguous: walk each row across all panels (one stream per row).
    for (int k = 0; k < kc; ++k) {
      const float* src = b.p + (p0 + k) * b.rs + j0;
      for (int jp = jp0; jp < jp1; ++jp) {
        const int nr = std::min(kNR, nc - jp * kNR);
        float* d = dst + (static_cast<long>(jp) * kc + k) * kNR;
        if (nr == kNR) {
          std::memcpy(d, src + jp * kNR, kNR * sizeof(float));
        } else {
          for (int j = 0; j < kNR; ++j) d[j] = j < nr ? src[jp * kNR + j] : 0.0f;
        }
      }
    }
    return;
  }
  // op(B) columns are contiguous (B transposed): transpose kNR x kc strips.
  for (int jp = jp0; jp < jp1; ++jp) {
    const int jstart = jp * kNR;
    const int nr = std::min(kNR, nc - jstart);
    float* d = dst + static_cast<long>(jp) * kc * kNR;
    int k0 = 0;
#ifdef __AVX__
    if (nr == kNR) {
      for (; k0 + 8 <= kc; k0 += 8) {
        for (int half = 0; half < kNR; half += 8) {
          const float* src = b.p + (j0 + jstart + half) * b.cs + p0 + k0;
          transpose8x8_store(src, b.cs, d + k0 * kNR + half, kNR);
        }
      }
    }
#endif
    for (int j = 0; j < kNR; ++j) {
      if (j < nr) {
        const float* src = b.p + (j0 + jstart + j) * b.cs + p0;
        for (int k = k0; k < kc; ++k) d[k * kNR + j] = src[k];
      } else {
        for (int k = k0; k < kc; ++k) d[k * kNR + j] = 0.0f;
      }
    }
  }
}

// acc (kMR, kNR) = Ap (kc, kMR)^T-packed times Bp (kc, kNR): for each element an FMA chain
// over k = 0..kc-1 in order, starting from zero.
__attribute__((noinline)) void micro_kernel(int kc, const float* __restrict ap,
                                            const float* __restrict bp, float* __restrict acc) {
  v8f c[kMR][2];
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) c[i][0] = c[i][1] = v8f{};
  for (int k = 0; k < kc; ++k) {
    v8f b0, b1;
    std::memcpy(&b0, bp, sizeof(v8f));
    std::memcpy(&b1, bp + 8, sizeof(v8f));
#pragma GCC unroll 6
    for (int i = 0; i < kMR; ++i) {
      const float a = ap[i];
      c[i][0] += a * b0;
      c[i][1] += a * b1;
    }
    ap += kMR;
    bp += kNR;
  }
#pragma GCC unroll 6
  for (int i = 0; i < kMR; ++i) {
    std::memcpy(acc + i * kNR, &c[i][0], sizeof(v8f));
    std::memcpy(acc + i * kNR + 8, &c[i][1], sizeof(v8f));
  }
}

// Folds one kKC block of products into C (mr, nr): the first block applies beta (and does
// not read C when beta == 0), later blocks add.
void store_tile(const float* acc, int mr, int nr, float alpha, float beta, bool first, float* c,
                int ldc) {
  for (int i = 0; i < mr; ++i) {
    float* crow = c + static_cast<long>(i) * ldc;
    const float* arow = acc + i * kNR;
    if (!first) {
      for (int j = 0; j < nr; ++j) crow[j] += alpha * arow[j];
    } else if (beta == 0.0f) {
      for (int j = 0; j < nr; ++j) crow[j] = alpha * arow[j];
    } else {
      for (int j = 0; j < nr; ++j) crow[j] = alpha * arow[j] + beta * crow[j];
    }
  }
}

// C = beta * C for the degenerate products (K == 0 or alpha == 0); beta == 0 writes zeros.
void scale_c(int M, int N, float beta, float* C, int ldc) {
  for (int i = 0; i < M; ++i) {
    float* crow = C + static_cast<long>(i) * ldc;
    for (int j = 0; j < N; ++j) crow[j] = beta == 0.0f ? 0.0f : beta * crow[j];
  }
}

void check_args(const char* who, Trans ta, Trans tb, int M, int N, int K, const float* A, int lda,
                const float* B, int ldb, const float* C, int ldc) {
  const std::string w(who);
  REMAT_CHECK(M >= 0 && N >= 0 && K >= 0, w + ": negative dimension");
  REMAT_CHECK(ldc >= std::max(N, 1), w + ": ldc < N");
  REMAT_CHECK(lda >= std::max(ta == Trans::kNo ? K : M, 1), w + ": lda too small");
  REMAT_CHECK(ldb >= std::max(tb == Trans::kNo ? N : K, 1), w + ": ldb too small");
  REMAT_CHECK(M == 0 || N == 0 || C != nullptr, w + ": C is null");
  REMAT_CHECK(M == 0 || N == 0 || K == 0 || (A != nullptr && B != nullptr), w + ": A or B is null");
}

void sgemm_blocked(Trans ta, Trans tb, int M, int N, int K, float alpha, const float* A, int lda,
                   const float* B, int ldb, float beta, float* C, int ldc) {
  const View a = make_view(ta, A, lda);
  const View b = make_view(tb, B, ldb);
  const int mc = balanced_block(M, kMCMax, kMR);  // rows per task
  const int n_mblocks = ceil_div(M, mc);
  PackBuffers& bufs = pack_buffers();
  float* bpack = bufs.b.get(static_cast<size_t>(kKC) * round_up(std::min(N, kNC), kNR));
  const size_t a_floats = static_cast<size_t>(mc) * kKC;  // mc is a multiple of kMR
  float* apack_all = bufs.a.get(a_floats * max_team_size());
  const bool parallel = 2.0 * M * N * K >= kParallelFlops;
  (void)parallel;  // unused without OpenMP

#pragma omp parallel if (parallel)
  {
    float* apack = apack_all + a_floats * team_rank();
    alignas(64) float acc[kMR * kNR];
    for (int jc = 0; jc < N; jc += kNC) {
      const int nc = std::min(kNC, N - jc);
      const int npanels = ceil_div(nc, kNR);
      const int nt = balanced_block(nc, kNTask, kNR);  // columns per task
      const int n_nblocks = ceil_div(nc, nt);
      for (int pc = 0; pc < K; pc += kKC) {
        const int kc = std::min(kKC, K - pc);
        const bool first = pc == 0;
        const int ngroups = ceil_div(npanels, kPackGroup);
#pragma omp for schedule(static)
        for (int g = 0; g < ngroups; ++g) {
          pack_b_panels(bpack, b, jc, nc, g * kPackGroup, std::min(npanels, (g + 1) * kPackGroup),
                        pc, kc);
        }
        // (implicit barrier: the panel is complete before any task reads it)
        int packed_mblock = -1;
#pragma omp for schedule(static)
        for (int task = 0; task < n_mblocks * n_nblocks; ++task) {
          const int ib = task / n_nblocks;
          const int jb = task % n_nblocks;
          const int i0 = ib * mc;
          const int mrows = std::min(mc, M - i0);
          if (ib != packed_mblock) {
            pack_a(apack, a, i0, mrows, pc, kc);
            packed_mblock = ib;
          }
          const int j_end = std::min(nc, (jb + 1) * nt);
          for (int jr = jb * nt; jr < j_end; jr += kNR) {
            const int nr = std::min(kNR, nc - jr);
            const float* bp = bpack + static_cast<long>(jr / kNR) * kc * kNR;
            for (int ir = 0; ir < mrows; ir += kMR) {
              const int mr = std::min(kMR, mrows - ir);
              float* ctile = C + static_cast<long>(i0 + ir) * ldc + jc + jr;
              // The tile of C is read after ~kc micro-kernel steps: start fetching it now.
              for (int i = 0; i < mr; ++i) {
                __builtin_prefetch(ctile + static_cast<long>(i) * ldc, 1, 3);
                __builtin_prefetch(ctile + static_cast<long>(i) * ldc + nr - 1, 1, 3);
              }
              micro_kernel(kc, apack + static_cast<long>(ir) * kc, bp, acc);
              store_tile(acc, mr, nr, alpha, beta, first, ctile, ldc);
            }
          }
        }
        // (implicit barrier: every task is done with the panel before it is repacked)
      }
    }
  }
}

}  // namespace

void set_gemm_naive(bool naive) {
  g_naive.store(naive, std::memory_order_relaxed);
}

void sgemm(Trans ta, Trans tb, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc) {
  if (g_naive.load(std::memory_order_relaxed)) {
    sgemm_naive(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  check_args("sgemm", ta, tb, M, N, K, A, lda, B, ldb, C, ldc);
  if (M == 0 || N == 0) return;
  if (K == 0 || alpha == 0.0f) {
    scale_c(M, N, beta, C, ldc);
    return;
  }
  sgemm_blocked(ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void sgemm_naive(Trans ta, Trans tb, int M, int N, int K, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc) {
  check_args("sgemm_naive", ta, tb, M, N, K, A, lda, B, ldb, C, ldc);
  const View a = make_view(ta, A, lda);
  const View b = make_view(tb, B, ldb);
#pragma omp parallel for schedule(static)
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = 0.0f;
      for (int k = 0; k < K; ++k) sum += a.at(i, k) * b.at(k, j);
      float& c = C[static_cast<long>(i) * ldc + j];
      c = beta == 0.0f ? alpha * sum : alpha * sum + beta * c;
    }
  }
}

}  // namespace remat::cpu
