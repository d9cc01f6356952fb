// Single-precision GEMM for the CPU backend: row-major, deterministic.
//
// Contract: every element of C is accumulated over k = 0..K-1 in the same order whatever
// the thread count or the calling thread, so two calls on equal inputs give equal bits
// (recompute relies on this). Parallel over tiles of C with OpenMP, never over K.
#pragma once
#include <cstddef>

namespace remat::cpu {

enum class Trans { kNo, kYes };

// C(M,N) = alpha * op(A)(M,K) * op(B)(K,N) + beta * C. Row-major; lda/ldb/ldc are row strides
// of the stored matrices. beta == 0 means C is written without being read (NaN in C is fine).
void sgemm(Trans ta, Trans tb, int M, int N, int K, float alpha, const float* A, int lda,
           const float* B, int ldb, float beta, float* C, int ldc);

// The same contract computed with plain OpenMP loops: the baseline the benchmark compares
// against and a reference for tests.
void sgemm_naive(Trans ta, Trans tb, int M, int N, int K, float alpha, const float* A, int lda,
                 const float* B, int ldb, float beta, float* C, int ldc);

// Selects which of the two sgemm() calls dispatch to (the benchmark's baseline switch).
void set_gemm_naive(bool naive);

}  // namespace remat::cpu
