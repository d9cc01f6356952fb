// CPU reference kernels against fp64 references written here: forwards on fresh random inputs
// at several (ragged) sizes, backwards against central differences of the fp64 forward,
// `=` vs `+=` contracts, and bitwise determinism across thread counts and calling threads.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/adamw.h"
#include "kernels/attention.h"
#include "kernels/classifier.h"
#include "kernels/common.h"
#include "kernels/encoder.h"
#include "kernels/gelu.h"
#include "kernels/gemm.h"
#include "kernels/gradnorm.h"
#include "kernels/layernorm.h"
#include "kernels/matmul.h"
#include "tests/kernel_test_util.h"

namespace remat::cpu {
namespace {

using namespace remat::cpu::test;  // NOLINT(google-build-using-namespace)

// Each got[i] within tol[i] of ref[i]; NaN never passes. Reports the first few misses.
void expect_close(const float* got, const DVec& ref, const DVec& tol, const std::string& what) {
  int bad = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double err = std::fabs(static_cast<double>(got[i]) - ref[i]);
    if (!(err <= tol[i])) {
      if (++bad <= 5) {
        ADD_FAILURE() << what << "[" << i << "]: got " << got[i] << " want " << ref[i] << " err "
                      << err << " tol " << tol[i];
      }
    }
  }
  EXPECT_EQ(bad, 0) << what << ": " << bad << " of " << ref.size() << " elements out of tolerance";
}

void expect_close(const Vec& got, const DVec& ref, const DVec& tol, const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  expect_close(got.data(), ref, tol, what);
}

// Gradient check: |analytic - numeric| <= rtol * max|numeric| over the checked indices.
void expect_grad_close(const float* analytic, const DVec& numeric, const std::vector<size_t>& idx,
                       double rtol, const std::string& what) {
  double scale = 0.0;
  for (double g : numeric) scale = std::max(scale, std::fabs(g));
  ASSERT_GT(scale, 0.0) << what << ": the numeric gradient is all zero, the check is vacuous";
  const DVec tol(idx.size(), rtol * scale);
  Vec got(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) got[i] = analytic[idx[i]];
  expect_close(got, numeric, tol, what);
}

// Central differences of f at the listed coordinates of x, in double.
DVec numeric_grad(const std::function<double(const DVec&)>& f, DVec x,
                  const std::vector<size_t>& idx, double h) {
  DVec g(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) {
    const double x0 = x[idx[i]];
    x[idx[i]] = x0 + h;
    const double fp = f(x);
    x[idx[i]] = x0 - h;
    const double fm = f(x);
    x[idx[i]] = x0;
    g[i] = (fp - fm) / (2 * h);
  }
  return g;
}

double dot(const DVec& a, const DVec& r) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * r[i];
  return s;
}

// ---------------------------------------------------------------------------------------------
// GEMM

double op_at(Trans t, const float* X, int ld, int r, int c) {
  return t == Trans::kNo ? X[static_cast<long>(r) * ld + c] : X[static_cast<long>(c) * ld + r];
}

struct GemmCase {
  Trans ta, tb;
  int M, N, K;
  float alpha, beta;
};

std::string describe(const GemmCase& g) {
  return std::string("sgemm(") + (g.ta == Trans::kYes ? "T" : "N") +
         (g.tb == Trans::kYes ? "T" : "N") + " M=" + std::to_string(g.M) +
         " N=" + std::to_string(g.N) + " K=" + std::to_string(g.K) +
         " alpha=" + std::to_string(g.alpha) + " beta=" + std::to_string(g.beta) + ")";
}

using GemmFn = void (*)(Trans, Trans, int, int, int, float, const float*, int, const float*, int,
                        float, float*, int);

// Runs fn on padded random operands and checks C (and that C's row padding is untouched)
// against an fp64 product. beta == 0 poisons C with NaN first.
void check_gemm(GemmFn fn, const GemmCase& g, Rng& rng) {
  const int arows = g.ta == Trans::kNo ? g.M : g.K, acols = g.ta == Trans::kNo ? g.K : g.M;
  const int brows = g.tb == Trans::kNo ? g.K : g.N, bcols = g.tb == Trans::kNo ? g.N : g.K;
  const int lda = acols + 3, ldb = bcols + 1, ldc = g.N + 2;
  const Vec A = rng.uniform(static_cast<size_t>(arows) * lda, -1, 1);
  const Vec B = rng.uniform(static_cast<size_t>(brows) * ldb, -1, 1);
  Vec C = rng.uniform(static_cast<size_t>(g.M) * ldc, -1, 1);
  const float sentinel = 12345.0f;
  for (int i = 0; i < g.M; ++i) {
    for (int j = 0; j < ldc; ++j) {
      float& c = C[static_cast<size_t>(i) * ldc + j];
      if (j >= g.N)
        c = sentinel;
      else if (g.beta == 0.0f)
        c = kNaN;
    }
  }
  const Vec C0 = C;
  fn(g.ta, g.tb, g.M, g.N, g.K, g.alpha, A.data(), lda, B.data(), ldb, g.beta, C.data(), ldc);
  DVec ref(static_cast<size_t>(g.M) * g.N), tol(ref.size());
  Vec got(ref.size());
  for (int i = 0; i < g.M; ++i) {
    for (int j = 0; j < g.N; ++j) {
      double sum = 0.0, mag = 0.0;
      for (int k = 0; k < g.K; ++k) {
        const double p = op_at(g.ta, A.data(), lda, i, k) * op_at(g.tb, B.data(), ldb, k, j);
        sum += p;
        mag += std::fabs(p);
      }
      const double c0 = g.beta == 0.0f ? 0.0 : C0[static_cast<size_t>(i) * ldc + j];
      const size_t o = static_cast<size_t>(i) * g.N + j;
      ref[o] = g.alpha * sum + g.beta * c0;
      // fp32 sum of K terms: a few ulps times sqrt(K) of the magnitudes involved.
      tol[o] = 1e-6 * (std::sqrt(static_cast<double>(g.K)) + 2) *
                   (std::fabs(g.alpha) * mag + std::fabs(g.beta * c0)) +
               1e-30;
      got[o] = C[static_cast<size_t>(i) * ldc + j];
    }
    for (int j = g.N; j < ldc; ++j) {
      ASSERT_EQ(C[static_cast<size_t>(i) * ldc + j], sentinel) << describe(g) << " wrote padding";
    }
  }
  expect_close(got, ref, tol, describe(g));
}

const Trans kTrans[] = {Trans::kNo, Trans::kYes};

TEST(Gemm, AllTransposesRaggedSizesMatchFp64) {
  Rng rng(1);
  const int mn[] = {1, 7, 33, 65, 130};
  const int ks[] = {1, 7, 65, 130, 300};  // 300 spans two K blocks
  for (Trans ta : kTrans)
    for (Trans tb : kTrans)
      for (int M : mn)
        for (int N : mn)
          for (int K : ks) {
            check_gemm(sgemm, {ta, tb, M, N, K, 1.0f, 0.0f}, rng);
            check_gemm(sgemm, {ta, tb, M, N, K, -0.75f, 1.5f}, rng);
          }
}

TEST(Gemm, NaiveMatchesFp64) {
  Rng rng(2);
  for (Trans ta : kTrans)
    for (Trans tb : kTrans)
      for (int M : {1, 13, 40})
        for (int N : {1, 17, 35}) {
          check_gemm(sgemm_naive, {ta, tb, M, N, 29, 1.0f, 0.0f}, rng);
          check_gemm(sgemm_naive, {ta, tb, M, N, 300, 0.5f, -1.0f}, rng);
        }
}

TEST(Gemm, WideAndDeepPanels) {
  Rng rng(3);
  for (Trans ta : kTrans)
    for (Trans tb : kTrans) {
      check_gemm(sgemm, {ta, tb, 9, 4200, 20, 1.0f, 0.0f}, rng);   // several column panels
      check_gemm(sgemm, {ta, tb, 150, 40, 600, 1.0f, 1.0f}, rng);  // several row and K blocks
    }
}

TEST(Gemm, DegenerateShapes) {
  Vec C(6, kNaN);
  const float one = 1.0f;
  sgemm(Trans::kNo, Trans::kNo, 2, 3, 0, 1.0f, &one, 1, &one, 3, 0.0f, C.data(), 3);
  for (float c : C) EXPECT_EQ(c, 0.0f);  // K == 0, beta == 0: zeros, NaN not read
  C.assign(6, 2.0f);
  sgemm(Trans::kNo, Trans::kNo, 2, 3, 0, 1.0f, &one, 1, &one, 3, 0.5f, C.data(), 3);
  for (float c : C) EXPECT_EQ(c, 1.0f);
  sgemm(Trans::kNo, Trans::kNo, 0, 3, 4, 1.0f, nullptr, 4, nullptr, 3, 0.0f, nullptr, 3);
  EXPECT_THROW(sgemm(Trans::kNo, Trans::kNo, -1, 3, 4, 1.0f, &one, 4, &one, 3, 0.0f, C.data(), 3),
               Error);
  EXPECT_THROW(sgemm(Trans::kNo, Trans::kNo, 2, 3, 4, 1.0f, &one, 2, &one, 3, 0.0f, C.data(), 3),
               Error);  // lda < K
}

// Restores the default dispatch even when a test fails.
struct NaiveGemmScope {
  NaiveGemmScope() { set_gemm_naive(true); }
  ~NaiveGemmScope() { set_gemm_naive(false); }
};

TEST(Gemm, NaiveSwitchDispatches) {
  Rng rng(4);
  const int M = 20, N = 30, K = 300;
  const Vec A = rng.uniform(M * K, -1, 1), B = rng.uniform(K * N, -1, 1);
  Vec c_naive(M * N), c_switched(M * N), c_fast(M * N);
  sgemm_naive(Trans::kNo, Trans::kNo, M, N, K, 1, A.data(), K, B.data(), N, 0, c_naive.data(), N);
  sgemm(Trans::kNo, Trans::kNo, M, N, K, 1, A.data(), K, B.data(), N, 0, c_fast.data(), N);
  {
    NaiveGemmScope scope;
    sgemm(Trans::kNo, Trans::kNo, M, N, K, 1, A.data(), K, B.data(), N, 0, c_switched.data(), N);
  }
  EXPECT_TRUE(same_bits(c_naive, c_switched));
  // The blocked kernel folds K in blocks of 256, so at K = 300 its bits differ from the naive
  // single chain: the switch really changed which kernel ran.
  EXPECT_FALSE(same_bits(c_naive, c_fast));
}

TEST(Gemm, BitwiseIndependentOfThreadsAndCallers) {
  Rng rng(5);
  const int M = 100, N = 300, K = 600;
  for (Trans ta : kTrans)
    for (Trans tb : kTrans) {
      const Vec A = rng.uniform(M * K, -1, 1), B = rng.uniform(K * N, -1, 1);
      const int lda = ta == Trans::kNo ? K : M, ldb = tb == Trans::kNo ? N : K;
      auto run = [&](Vec& C) {
        C.assign(M * N, kNaN);
        sgemm(ta, tb, M, N, K, 1, A.data(), lda, B.data(), ldb, 0, C.data(), N);
      };
      Vec c1, c2, c3, again;
      with_threads(1, [&] { run(c1); });
      with_threads(2, [&] { run(c2); });
      with_threads(3, [&] { run(c3); });
      run(again);
      EXPECT_TRUE(same_bits(c1, c2));
      EXPECT_TRUE(same_bits(c1, c3));
      EXPECT_TRUE(same_bits(c1, again));
      // Two std::threads at once, each with its own OpenMP team and packing buffers.
      Vec t1, t2;
      std::thread th1([&] {
        for (int r = 0; r < 3; ++r) run(t1);
      });
      std::thread th2([&] {
        for (int r = 0; r < 3; ++r) run(t2);
      });
      th1.join();
      th2.join();
      EXPECT_TRUE(same_bits(c1, t1));
      EXPECT_TRUE(same_bits(c1, t2));
    }
}

// ---------------------------------------------------------------------------------------------
// matmul

DVec ref_matmul(const DVec& inp, const DVec& w, const DVec* bias, int N, int C, int OC) {
  DVec out(static_cast<size_t>(N) * OC);
  for (int n = 0; n < N; ++n)
    for (int o = 0; o < OC; ++o) {
      double s = bias ? (*bias)[o] : 0.0;
      for (int c = 0; c < C; ++c) s += inp[n * C + c] * w[o * C + c];
      out[n * OC + o] = s;
    }
  return out;
}

TEST(Matmul, ForwardMatchesFp64) {
  Rng rng(10);
  struct S {
    int N, C, OC;
  };
  for (S s : {S{1, 7, 3}, S{13, 24, 40}, S{64, 48, 100}, S{5, 300, 17}}) {
    const Vec inp = rng.uniform(s.N * s.C, -1, 1), w = rng.uniform(s.OC * s.C, -1, 1);
    const Vec bias = rng.uniform(s.OC, -1, 1);
    for (bool with_bias : {false, true}) {
      Vec out(s.N * s.OC, kNaN);
      matmul_forward(out.data(), inp.data(), w.data(), with_bias ? bias.data() : nullptr, s.N, s.C,
                     s.OC);
      const DVec db = to_double(bias);
      const DVec ref =
          ref_matmul(to_double(inp), to_double(w), with_bias ? &db : nullptr, s.N, s.C, s.OC);
      const DVec tol(ref.size(), 1e-6 * (std::sqrt(s.C) + 2) * (s.C + 1));
      expect_close(out, ref, tol, "matmul_forward N=" + std::to_string(s.N));
    }
  }
}

TEST(Matmul, BackwardMatchesFiniteDifferencesAndAccumulates) {
  Rng rng(11);
  struct S {
    int N, C, OC;
  };
  for (S s : {S{1, 7, 3}, S{13, 24, 40}, S{7, 33, 65}}) {
    const Vec inp = rng.uniform(s.N * s.C, -1, 1), w = rng.uniform(s.OC * s.C, -1, 1);
    const Vec bias = rng.uniform(s.OC, -1, 1), r = rng.uniform(s.N * s.OC, -1, 1);
    const DVec rd = to_double(r);
    // L = sum(out * r), so dout = r.
    Vec dinp(s.N * s.C, kNaN), dw(s.OC * s.C, 0.0f), dbias(s.OC, 0.0f);
    matmul_backward(dinp.data(), dw.data(), dbias.data(), r.data(), inp.data(), w.data(), s.N, s.C,
                    s.OC);
    const DVec inp_d = to_double(inp), w_d = to_double(w), b_d = to_double(bias);
    const auto idx_inp = rng.subset(inp.size(), 60), idx_w = rng.subset(w.size(), 60);
    const auto idx_b = rng.subset(bias.size(), 60);
    const std::string tag = " N=" + std::to_string(s.N);
    expect_grad_close(
        dinp.data(),
        numeric_grad(
            [&](const DVec& x) { return dot(ref_matmul(x, w_d, &b_d, s.N, s.C, s.OC), rd); }, inp_d,
            idx_inp, 1e-3),
        idx_inp, 1e-5, "matmul dinp" + tag);
    expect_grad_close(
        dw.data(),
        numeric_grad(
            [&](const DVec& x) { return dot(ref_matmul(inp_d, x, &b_d, s.N, s.C, s.OC), rd); }, w_d,
            idx_w, 1e-3),
        idx_w, 1e-5, "matmul dw" + tag);
    expect_grad_close(
        dbias.data(),
        numeric_grad(
            [&](const DVec& x) { return dot(ref_matmul(inp_d, w_d, &x, s.N, s.C, s.OC), rd); }, b_d,
            idx_b, 1e-3),
        idx_b, 1e-5, "matmul dbias" + tag);

    // `+=` for dw and dbias, `=` for dinp: a second call on pre-filled buffers.
    const Vec dw0 = rng.uniform(dw.size(), -1, 1), db0 = rng.uniform(dbias.size(), -1, 1);
    Vec dw2 = dw0, db2 = db0, dinp2(dinp.size(), 7.0f);
    matmul_backward(dinp2.data(), dw2.data(), db2.data(), r.data(), inp.data(), w.data(), s.N, s.C,
                    s.OC);
    EXPECT_TRUE(same_bits(dinp, dinp2)) << "dinp must be overwritten" << tag;
    DVec want_w(dw.size()), want_b(dbias.size());
    for (size_t i = 0; i < dw.size(); ++i) want_w[i] = static_cast<double>(dw0[i]) + dw[i];
    for (size_t i = 0; i < dbias.size(); ++i) want_b[i] = static_cast<double>(db0[i]) + dbias[i];
    expect_close(dw2, want_w, DVec(dw.size(), 1e-6 * (2 + s.N)), "matmul dw accumulates" + tag);
    expect_close(db2, want_b, DVec(dbias.size(), 1e-6 * (2 + s.N)),
                 "matmul dbias accumulates" + tag);
    // Null dinp and dbias are skipped; dw still accumulates.
    Vec dw3(dw.size(), 0.0f);
    matmul_backward(nullptr, dw3.data(), nullptr, r.data(), inp.data(), w.data(), s.N, s.C, s.OC);
    EXPECT_TRUE(same_bits(dw, dw3)) << tag;
  }
}

TEST(Matmul, BitwiseIndependentOfThreads) {
  Rng rng(12);
  const int N = 64, C = 96, OC = 200;
  const Vec inp = rng.uniform(N * C, -1, 1), w = rng.uniform(OC * C, -1, 1);
  const Vec bias = rng.uniform(OC, -1, 1), dout = rng.uniform(N * OC, -1, 1);
  std::vector<Vec> results[3];
  for (int th = 1; th <= 3; ++th) {
    with_threads(th, [&] {
      Vec out(N * OC), dinp(N * C), dw(OC * C, 0.0f), db(OC, 0.0f);
      matmul_forward(out.data(), inp.data(), w.data(), bias.data(), N, C, OC);
      matmul_backward(dinp.data(), dw.data(), db.data(), dout.data(), inp.data(), w.data(), N, C,
                      OC);
      results[th - 1] = {out, dinp, dw, db};
    });
  }
  for (int th = 1; th < 3; ++th)
    for (size_t i = 0; i < results[0].size(); ++i)
      EXPECT_TRUE(same_bits(results[0][i], results[th][i])) << "output " << i;
}

// ---------------------------------------------------------------------------------------------
// encoder

TEST(Encoder, ForwardExactAndBackwardScatter) {
  Rng rng(20);
  struct S {
    int B, T, C, V;
  };
  for (S s : {S{1, 1, 1, 1}, S{2, 7, 24, 5}, S{3, 20, 100, 30}}) {
    const int BT = s.B * s.T;
    const std::vector<int> tokens = rng.ints(BT, 0, s.V - 1);  // small V: many repeats
    const Vec wte = rng.uniform(s.V * s.C, -1, 1), wpe = rng.uniform(s.T * s.C, -1, 1);
    Vec out(BT * s.C, kNaN);
    encoder_forward(out.data(), tokens.data(), wte.data(), wpe.data(), s.B, s.T, s.C);
    for (int bt = 0; bt < BT; ++bt)
      for (int c = 0; c < s.C; ++c) {
        // One rounding of an exact double sum: equal to the float add.
        const float want = static_cast<float>(static_cast<double>(wte[tokens[bt] * s.C + c]) +
                                              wpe[(bt % s.T) * s.C + c]);
        ASSERT_EQ(out[bt * s.C + c], want) << "bt=" << bt << " c=" << c;
      }

    const Vec dout = rng.uniform(BT * s.C, -1, 1);
    const Vec dwte0 = rng.uniform(s.V * s.C, -1, 1), dwpe0 = rng.uniform(s.T * s.C, -1, 1);
    Vec dwte = dwte0, dwpe = dwpe0;
    encoder_backward(dwte.data(), dwpe.data(), dout.data(), tokens.data(), s.B, s.T, s.C);
    DVec ref_te = to_double(dwte0), ref_tp = to_double(dwpe0);
    for (int bt = 0; bt < BT; ++bt)
      for (int c = 0; c < s.C; ++c) {
        ref_te[tokens[bt] * s.C + c] += dout[bt * s.C + c];
        ref_tp[(bt % s.T) * s.C + c] += dout[bt * s.C + c];
      }
    const double tol = 1e-6 * (BT + 2);
    expect_close(dwte, ref_te, DVec(ref_te.size(), tol), "encoder dwte");
    expect_close(dwpe, ref_tp, DVec(ref_tp.size(), tol), "encoder dwpe");
  }
}

TEST(Encoder, BackwardBitwiseIndependentOfThreads) {
  Rng rng(21);
  const int B = 3, T = 20, C = 100, V = 7;
  const std::vector<int> tokens = rng.ints(B * T, 0, V - 1);
  const Vec dout = rng.uniform(B * T * C, -1, 1), init = rng.uniform(V * C, -1, 1);
  Vec te[3], pe[3];
  for (int th = 1; th <= 3; ++th) {
    te[th - 1] = init;
    pe[th - 1] = Vec(T * C, 0.5f);
    with_threads(th, [&] {
      encoder_backward(te[th - 1].data(), pe[th - 1].data(), dout.data(), tokens.data(), B, T, C);
    });
  }
  EXPECT_TRUE(same_bits(te[0], te[1]) && same_bits(te[0], te[2]));
  EXPECT_TRUE(same_bits(pe[0], pe[1]) && same_bits(pe[0], pe[2]));
}

// ---------------------------------------------------------------------------------------------
// layernorm

struct LnRef {
  DVec out, mean, rstd;
};

LnRef ref_layernorm(const DVec& x, const DVec& w, const DVec& b, int N, int C) {
  LnRef r{DVec(x.size()), DVec(N), DVec(N)};
  for (int n = 0; n < N; ++n) {
    double m = 0.0, v = 0.0;
    for (int c = 0; c < C; ++c) m += x[n * C + c];
    m /= C;
    for (int c = 0; c < C; ++c) v += (x[n * C + c] - m) * (x[n * C + c] - m);
    const double s = 1.0 / std::sqrt(v / C + 1e-5);
    for (int c = 0; c < C; ++c) r.out[n * C + c] = (x[n * C + c] - m) * s * w[c] + b[c];
    r.mean[n] = m;
    r.rstd[n] = s;
  }
  return r;
}

struct LnSize {
  int N, C;
};
const LnSize kLnSizes[] = {{1, 1}, {5, 24}, {13, 7}, {4, 768}};

TEST(LayerNorm, ForwardMatchesFp64) {
  Rng rng(30);
  for (LnSize s : kLnSizes) {
    const Vec x = rng.normal(s.N * s.C, 1.5f, 3.0f);  // off-centre rows
    const Vec w = rng.uniform(s.C, 0.5f, 1.5f), b = rng.uniform(s.C, -1, 1);
    Vec out(x.size(), kNaN), mean(s.N, kNaN), rstd(s.N, kNaN);
    layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), s.N, s.C);
    const LnRef ref = ref_layernorm(to_double(x), to_double(w), to_double(b), s.N, s.C);
    DVec tol(x.size()), tol_m(s.N), tol_r(s.N);
    for (int n = 0; n < s.N; ++n) {
      tol_m[n] = 1e-6 * (std::fabs(ref.mean[n]) + 1e-3);
      tol_r[n] = 1e-6 * ref.rstd[n];
      for (int c = 0; c < s.C; ++c) {
        const size_t i = static_cast<size_t>(n) * s.C + c;
        // float (x - mean) * rstd * w + b: ulps of |x| + |mean| scaled, then of the result.
        tol[i] = 4e-7 * ((std::fabs(x[i]) + std::fabs(ref.mean[n])) * ref.rstd[n] * w[c] +
                         std::fabs(b[c])) +
                 1e-7;
      }
    }
    const std::string tag = " N=" + std::to_string(s.N) + " C=" + std::to_string(s.C);
    expect_close(out, ref.out, tol, "layernorm out" + tag);
    expect_close(mean, ref.mean, tol_m, "layernorm mean" + tag);
    expect_close(rstd, ref.rstd, tol_r, "layernorm rstd" + tag);
    // mean and rstd are optional and do not change out.
    Vec out2(x.size(), kNaN);
    layernorm_forward(out2.data(), nullptr, nullptr, x.data(), w.data(), b.data(), s.N, s.C);
    EXPECT_TRUE(same_bits(out, out2)) << tag;
  }
}

TEST(LayerNorm, FusedResidualIsBitwiseEqualToAddThenNormalize) {
  Rng rng(31);
  for (LnSize s : kLnSizes) {
    const Vec x = rng.normal(s.N * s.C, 1.0f), y = rng.normal(s.N * s.C, 1.0f, 0.5f);
    const Vec w = rng.uniform(s.C, 0.5f, 1.5f), b = rng.uniform(s.C, -1, 1);
    Vec res(x.size(), kNaN), out(x.size(), kNaN), mean(s.N, kNaN), rstd(s.N, kNaN);
    residual_layernorm_forward(res.data(), out.data(), mean.data(), rstd.data(), x.data(), y.data(),
                               w.data(), b.data(), s.N, s.C);
    Vec res2(x.size()), out2(x.size(), kNaN), mean2(s.N, kNaN), rstd2(s.N, kNaN);
    for (size_t i = 0; i < x.size(); ++i) res2[i] = x[i] + y[i];
    layernorm_forward(out2.data(), mean2.data(), rstd2.data(), res2.data(), w.data(), b.data(), s.N,
                      s.C);
    EXPECT_TRUE(same_bits(res, res2));
    EXPECT_TRUE(same_bits(out, out2));
    EXPECT_TRUE(same_bits(mean, mean2));
    EXPECT_TRUE(same_bits(rstd, rstd2));
  }
}

TEST(LayerNorm, BackwardMatchesFiniteDifferencesAndAccumulates) {
  Rng rng(32);
  for (LnSize s : {LnSize{1, 3}, LnSize{5, 24}, LnSize{13, 7}, LnSize{3, 100}}) {
    const Vec x = rng.normal(s.N * s.C, 1.0f, 0.5f);
    const Vec w = rng.uniform(s.C, 0.5f, 1.5f), b = rng.uniform(s.C, -1, 1);
    const Vec r = rng.uniform(x.size(), -1, 1);
    Vec out(x.size()), mean(s.N), rstd(s.N);
    layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), s.N, s.C);
    Vec dx(x.size(), 0.0f), dw(s.C, 0.0f), db(s.C, 0.0f);
    layernorm_backward(dx.data(), dw.data(), db.data(), r.data(), x.data(), w.data(), mean.data(),
                       rstd.data(), s.N, s.C);
    const DVec xd = to_double(x), wd = to_double(w), bd = to_double(b), rd = to_double(r);
    const auto ix = rng.subset(x.size(), 150), iw = rng.subset(w.size(), 60);
    const std::string tag = " N=" + std::to_string(s.N) + " C=" + std::to_string(s.C);
    expect_grad_close(
        dx.data(),
        numeric_grad([&](const DVec& v) { return dot(ref_layernorm(v, wd, bd, s.N, s.C).out, rd); },
                     xd, ix, 1e-4),
        ix, 1e-4, "layernorm dinp" + tag);
    expect_grad_close(
        dw.data(),
        numeric_grad([&](const DVec& v) { return dot(ref_layernorm(xd, v, bd, s.N, s.C).out, rd); },
                     wd, iw, 1e-4),
        iw, 1e-4, "layernorm dw" + tag);
    expect_grad_close(
        db.data(),
        numeric_grad([&](const DVec& v) { return dot(ref_layernorm(xd, wd, v, s.N, s.C).out, rd); },
                     bd, iw, 1e-4),
        iw, 1e-4, "layernorm db" + tag);

    // All three outputs are `+=`: the same terms land on pre-filled buffers. dw and db add one
    // finished float per channel (bitwise predictable); dinp's add may fuse into an FMA, so it
    // is held to the rounding of one add.
    const Vec dx0 = rng.uniform(x.size(), -1, 1), dw0 = rng.uniform(s.C, -1, 1);
    const Vec db0 = rng.uniform(s.C, -1, 1);
    Vec dx2 = dx0, dw2 = dw0, db2 = db0;
    layernorm_backward(dx2.data(), dw2.data(), db2.data(), r.data(), x.data(), w.data(),
                       mean.data(), rstd.data(), s.N, s.C);
    DVec want_x(x.size()), tol_x(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      want_x[i] = static_cast<double>(dx0[i]) + dx[i];
      tol_x[i] = 2.5e-7 * (std::fabs(dx0[i]) + std::fabs(dx[i]));
    }
    expect_close(dx2, want_x, tol_x, "layernorm dinp accumulates" + tag);
    Vec want_w = dw0, want_b = db0;
    for (int c = 0; c < s.C; ++c) {
      want_w[c] += dw[c];
      want_b[c] += db[c];
    }
    EXPECT_TRUE(same_bits(dw2, want_w)) << tag;
    EXPECT_TRUE(same_bits(db2, want_b)) << tag;
  }
}

TEST(LayerNorm, BitwiseIndependentOfThreads) {
  Rng rng(33);
  const int N = 50, C = 200;
  const Vec x = rng.normal(N * C, 1.0f), w = rng.uniform(C, 0.5f, 1.5f);
  const Vec b = rng.uniform(C, -1, 1), dout = rng.uniform(N * C, -1, 1);
  std::vector<Vec> res[3];
  for (int th = 1; th <= 3; ++th) {
    with_threads(th, [&] {
      Vec out(N * C), mean(N), rstd(N), dx(N * C, 0.0f), dw(C, 0.0f), db(C, 0.0f);
      layernorm_forward(out.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), N, C);
      layernorm_backward(dx.data(), dw.data(), db.data(), dout.data(), x.data(), w.data(),
                         mean.data(), rstd.data(), N, C);
      res[th - 1] = {out, mean, rstd, dx, dw, db};
    });
  }
  for (int th = 1; th < 3; ++th)
    for (size_t i = 0; i < res[0].size(); ++i)
      EXPECT_TRUE(same_bits(res[0][i], res[th][i])) << "output " << i;
}

// ---------------------------------------------------------------------------------------------
// gelu

double ref_gelu(double x) {
  const double u = std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x);
  return 0.5 * x * (1.0 + std::tanh(u));
}

TEST(Gelu, ForwardAndBackwardMatchFp64) {
  Rng rng(40);
  for (size_t n : {size_t{1}, size_t{13}, size_t{1000}, size_t{40000}}) {
    const Vec x = rng.uniform(n, -6, 6), dout = rng.uniform(n, -1, 1);
    Vec out(n, kNaN), dx(n, kNaN);
    gelu_forward(out.data(), x.data(), n);
    gelu_backward(dx.data(), x.data(), dout.data(), n);
    DVec ref(n), tol(n), dref(n), dtol(n);
    for (size_t i = 0; i < n; ++i) {
      const double xi = x[i], ax = std::fabs(xi);
      ref[i] = ref_gelu(xi);
      tol[i] = 1e-6 * ax + 1e-7;
      const double h = 1e-5;
      dref[i] = (ref_gelu(xi + h) - ref_gelu(xi - h)) / (2 * h) * dout[i];
      // float sech^2 = 1 - tanh^2 loses ulps of 1, amplified by x du/dx.
      dtol[i] = 1e-6 * (1 + ax + 0.2 * ax * ax * ax) * std::fabs(dout[i]) + 1e-9;
    }
    expect_close(out, ref, tol, "gelu_forward n=" + std::to_string(n));
    expect_close(dx, dref, dtol, "gelu_backward n=" + std::to_string(n));
    // In-place forms give the same bits.
    Vec inplace = x;
    gelu_forward(inplace.data(), inplace.data(), n);
    EXPECT_TRUE(same_bits(inplace, out));
    Vec dinplace = dout;
    gelu_backward(dinplace.data(), x.data(), dinplace.data(), n);
    EXPECT_TRUE(same_bits(dinplace, dx));
  }
}

// ---------------------------------------------------------------------------------------------
// attention

struct AttnRef {
  DVec out, lse;
};

AttnRef ref_attention(const DVec& qkv, int B, int T, int C, int NH) {
  const int HD = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HD));
  AttnRef r{DVec(static_cast<size_t>(B) * T * C), DVec(static_cast<size_t>(B) * NH * T)};
  DVec s(T);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < T; ++t) {
        const double* q = &qkv[(static_cast<size_t>(b) * T + t) * 3 * C + h * HD];
        double m = -1e300;
        for (int j = 0; j <= t; ++j) {
          const double* k = &qkv[(static_cast<size_t>(b) * T + j) * 3 * C + C + h * HD];
          double dotqk = 0.0;
          for (int c = 0; c < HD; ++c) dotqk += q[c] * k[c];
          s[j] = dotqk * scale;
          m = std::max(m, s[j]);
        }
        double sum = 0.0;
        for (int j = 0; j <= t; ++j) sum += std::exp(s[j] - m);
        double* o = &r.out[(static_cast<size_t>(b) * T + t) * C + h * HD];
        for (int c = 0; c < HD; ++c) o[c] = 0.0;
        for (int j = 0; j <= t; ++j) {
          const double p = std::exp(s[j] - m) / sum;
          const double* v = &qkv[(static_cast<size_t>(b) * T + j) * 3 * C + 2 * C + h * HD];
          for (int c = 0; c < HD; ++c) o[c] += p * v[c];
        }
        r.lse[(static_cast<size_t>(b) * NH + h) * T + t] = m + std::log(sum);
      }
  return r;
}

struct AttnSize {
  int B, T, C, NH;
};

TEST(Attention, ForwardMatchesFp64) {
  Rng rng(50);
  for (AttnSize s : {AttnSize{1, 1, 4, 1}, AttnSize{2, 7, 24, 3}, AttnSize{1, 33, 32, 2},
                     AttnSize{2, 64, 128, 2}}) {
    const Vec qkv = rng.normal(static_cast<size_t>(s.B) * s.T * 3 * s.C, 1.0f);
    Vec out(static_cast<size_t>(s.B) * s.T * s.C, kNaN), lse(s.B * s.NH * s.T, kNaN);
    attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, s.C, s.NH);
    const AttnRef ref = ref_attention(to_double(qkv), s.B, s.T, s.C, s.NH);
    const int HD = s.C / s.NH;
    double vmax = 0.0;
    for (int bt = 0; bt < s.B * s.T; ++bt)
      for (int c = 0; c < s.C; ++c)
        vmax = std::max(vmax, static_cast<double>(std::fabs(qkv[bt * 3 * s.C + 2 * s.C + c])));
    // Scores are sums of HD products, outputs averages of up to T values.
    const double rel = 1e-6 * (std::sqrt(static_cast<double>(HD)) + std::sqrt(s.T) + 2);
    DVec tol(ref.out.size(), rel * vmax), tol_lse(ref.lse.size());
    for (size_t i = 0; i < tol_lse.size(); ++i) tol_lse[i] = rel * (std::fabs(ref.lse[i]) + 1);
    const std::string tag = " T=" + std::to_string(s.T) + " C=" + std::to_string(s.C);
    expect_close(out, ref.out, tol, "attention out" + tag);
    expect_close(lse, ref.lse, tol_lse, "attention lse" + tag);
  }
}

TEST(Attention, BackwardMatchesFiniteDifferences) {
  Rng rng(51);
  for (AttnSize s : {AttnSize{1, 1, 4, 1}, AttnSize{2, 7, 24, 3}, AttnSize{1, 33, 32, 2}}) {
    const size_t nqkv = static_cast<size_t>(s.B) * s.T * 3 * s.C;
    const Vec qkv = rng.normal(nqkv, 1.0f);
    const Vec r = rng.uniform(static_cast<size_t>(s.B) * s.T * s.C, -1, 1);
    Vec out(r.size()), lse(s.B * s.NH * s.T), dqkv(nqkv, kNaN);
    attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, s.C, s.NH);
    attention_backward(dqkv.data(), r.data(), qkv.data(), out.data(), lse.data(), s.B, s.T, s.C,
                       s.NH);
    const DVec rd = to_double(r);
    const auto idx = rng.subset(nqkv, 300);
    const DVec num = numeric_grad(
        [&](const DVec& x) { return dot(ref_attention(x, s.B, s.T, s.C, s.NH).out, rd); },
        to_double(qkv), idx, 1e-5);
    expect_grad_close(dqkv.data(), num, idx, 1e-4, "attention dqkv T=" + std::to_string(s.T));
    for (float g : dqkv) ASSERT_FALSE(std::isnan(g)) << "dqkv not fully overwritten";
  }
}

TEST(Attention, BitwiseIndependentOfThreadsAndCallers) {
  Rng rng(52);
  const int B = 2, T = 40, C = 64, NH = 4;
  const Vec qkv = rng.normal(B * T * 3 * C, 1.0f), dout = rng.uniform(B * T * C, -1, 1);
  auto run = [&](std::vector<Vec>& res) {
    Vec out(B * T * C), lse(B * NH * T), dqkv(B * T * 3 * C);
    attention_forward(out.data(), lse.data(), qkv.data(), B, T, C, NH);
    attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), B, T, C, NH);
    res = {out, lse, dqkv};
  };
  std::vector<Vec> res[3], t1, t2;
  for (int th = 1; th <= 3; ++th) with_threads(th, [&] { run(res[th - 1]); });
  std::thread a([&] { run(t1); }), b([&] { run(t2); });
  a.join();
  b.join();
  for (size_t i = 0; i < res[0].size(); ++i) {
    EXPECT_TRUE(same_bits(res[0][i], res[1][i]) && same_bits(res[0][i], res[2][i])) << i;
    EXPECT_TRUE(same_bits(res[0][i], t1[i]) && same_bits(res[0][i], t2[i])) << i;
  }
  EXPECT_THROW(attention_forward(nullptr, nullptr, qkv.data(), 1, T, 30, 4), Error);
}

// ---------------------------------------------------------------------------------------------
// classifier

struct ClsRef {
  DVec losses;
  double mean;
  DVec dx, dwte;        // gradient of dloss * sum(losses); dwte (V, C)
  DVec dx_mag, dw_mag;  // sums of |terms| of each gradient element, for tolerances
  DVec logit_mag;       // per row: max over j of sum_c |x w|
};

ClsRef ref_classifier(const Vec& x, const Vec& wte, const std::vector<int>& tgt, int N, int C,
                      int V, double dloss) {
  ClsRef r{DVec(N),
           0.0,
           DVec(static_cast<size_t>(N) * C, 0.0),
           DVec(static_cast<size_t>(V) * C, 0.0),
           DVec(static_cast<size_t>(N) * C, 0.0),
           DVec(static_cast<size_t>(V) * C, 0.0),
           DVec(N, 0.0)};
  DVec l(V);
  for (int n = 0; n < N; ++n) {
    double m = -1e300;
    for (int j = 0; j < V; ++j) {
      double s = 0.0, mag = 0.0;
      for (int c = 0; c < C; ++c) {
        s += static_cast<double>(x[n * C + c]) * wte[j * C + c];
        mag += std::fabs(static_cast<double>(x[n * C + c]) * wte[j * C + c]);
      }
      l[j] = s;
      m = std::max(m, s);
      r.logit_mag[n] = std::max(r.logit_mag[n], mag);
    }
    double sum = 0.0;
    for (int j = 0; j < V; ++j) sum += std::exp(l[j] - m);
    const double lse = m + std::log(sum);
    r.losses[n] = lse - l[tgt[n]];
    r.mean += r.losses[n];
    for (int j = 0; j < V; ++j) {
      const double p = std::exp(l[j] - lse), onehot = j == tgt[n] ? 1.0 : 0.0;
      const double g = (p - onehot) * dloss;
      const double g_mag = (p + onehot) * std::fabs(dloss);  // p's error is relative to p
      for (int c = 0; c < C; ++c) {
        r.dx[n * C + c] += g * wte[j * C + c];
        r.dx_mag[n * C + c] += g_mag * std::fabs(wte[j * C + c]);
        r.dwte[j * C + c] += g * x[n * C + c];
        r.dw_mag[j * C + c] += g_mag * std::fabs(x[n * C + c]);
      }
    }
  }
  r.mean /= N;
  return r;
}

TEST(Classifier, MatchesFp64IgnoresPaddingAndChunking) {
  Rng rng(60);
  struct S {
    int N, C, V, Vp;
  };
  for (S s : {S{1, 4, 3, 3}, S{13, 24, 37, 48}, S{20, 32, 300, 320}}) {
    const Vec x = rng.normal(s.N * s.C, 1.0f);
    Vec wte = rng.normal(static_cast<size_t>(s.Vp) * s.C, 0.5f);
    for (size_t i = static_cast<size_t>(s.V) * s.C; i < wte.size(); ++i) wte[i] = 1e30f;
    const std::vector<int> tgt = rng.ints(s.N, 0, s.V - 1);
    const float dloss = 1.0f / s.N;
    const ClsRef ref = ref_classifier(x, wte, tgt, s.N, s.C, s.V, dloss);
    const Vec dwte0 = rng.uniform(wte.size(), -1, 1);
    const std::string tag = " N=" + std::to_string(s.N) + " V=" + std::to_string(s.V);
    // fp32 logits: sums of C products. Softmax terms carry the logits' error as a relative
    // error; the gradient GEMMs add sums of up to V (or N) terms.
    const double rel = 1e-6 * (std::sqrt(static_cast<double>(s.C)) + 2);
    double max_lmag = 0.0;
    for (double m : ref.logit_mag) max_lmag = std::max(max_lmag, m);
    const double grad_rel =
        2 * rel * max_lmag + 1e-6 * (std::sqrt(static_cast<double>(std::max(s.V, s.N))) + 2);

    Vec first_losses, first_dx, first_dwte;
    float first_mean = 0.0f;
    for (int chunk : {1, 3, s.N}) {
      Vec losses(s.N, kNaN), dx(s.N * s.C, kNaN), dwte = dwte0;
      Vec ws(classifier_workspace_floats(chunk, s.Vp), kNaN);
      const float mean =
          classifier_forward_backward(losses.data(), dx.data(), dwte.data(), x.data(), wte.data(),
                                      tgt.data(), s.N, s.C, s.V, s.Vp, dloss, ws.data(), chunk);
      const std::string ctag = tag + " chunk=" + std::to_string(chunk);
      DVec tol_l(s.N), tol_dx(dx.size()), want_dwte(static_cast<size_t>(s.V) * s.C),
          tol_dw(want_dwte.size());
      double tol_mean = 0.0;
      for (int n = 0; n < s.N; ++n) {
        tol_l[n] = 2 * rel * ref.logit_mag[n] + 1e-6 * ref.losses[n];
        tol_mean += tol_l[n] / s.N;
      }
      for (size_t i = 0; i < dx.size(); ++i) tol_dx[i] = grad_rel * ref.dx_mag[i] + 1e-9;
      for (size_t i = 0; i < want_dwte.size(); ++i) {
        want_dwte[i] = ref.dwte[i] + dwte0[i];
        tol_dw[i] = grad_rel * ref.dw_mag[i] + 1e-6 * std::fabs(dwte0[i]) + 1e-9;
      }
      expect_close(losses, ref.losses, tol_l, "classifier losses" + ctag);
      EXPECT_NEAR(mean, ref.mean, tol_mean + 1e-6 * ref.mean) << ctag;
      expect_close(dx, ref.dx, tol_dx, "classifier dx" + ctag);
      expect_close(dwte.data(), want_dwte, tol_dw, "classifier dwte" + ctag);
      for (size_t i = want_dwte.size(); i < dwte.size(); ++i) {
        ASSERT_EQ(dwte[i], dwte0[i]) << "padded rows of dwte must stay untouched" << ctag;
      }
      if (first_losses.empty()) {
        first_losses = losses;
        first_dx = dx;
        first_dwte = dwte;
        first_mean = mean;
      } else {
        // Per-row results do not depend on the chunking; dwte only up to rounding.
        EXPECT_TRUE(same_bits(losses, first_losses)) << ctag;
        EXPECT_TRUE(same_bits(dx, first_dx)) << ctag;
        EXPECT_EQ(mean, first_mean) << ctag;
      }
      // Forward only: same losses, no gradient written.
      Vec losses_fwd(s.N, kNaN);
      const float mean_fwd =
          classifier_forward_backward(losses_fwd.data(), nullptr, nullptr, x.data(), wte.data(),
                                      tgt.data(), s.N, s.C, s.V, s.Vp, dloss, ws.data(), chunk);
      EXPECT_TRUE(same_bits(losses_fwd, losses)) << ctag;
      EXPECT_EQ(mean_fwd, mean) << ctag;
    }
    // dwte is `+=`: a second pass adds the same gradient again.
    Vec losses(s.N), dx(s.N * s.C), dwte(wte.size(), 0.0f);
    Vec ws(classifier_workspace_floats(s.N, s.Vp));
    for (int pass = 0; pass < 2; ++pass) {
      classifier_forward_backward(losses.data(), dx.data(), dwte.data(), x.data(), wte.data(),
                                  tgt.data(), s.N, s.C, s.V, s.Vp, dloss, ws.data(), s.N);
    }
    DVec twice(ref.dwte.size()), tol2(ref.dwte.size());
    for (size_t i = 0; i < twice.size(); ++i) {
      twice[i] = 2 * ref.dwte[i];
      tol2[i] = 2 * grad_rel * ref.dw_mag[i] + 1e-9;
    }
    expect_close(dwte.data(), twice, tol2, "classifier dwte accumulates" + tag);
  }
}

TEST(Classifier, LogitsPadWithMinusInfinity) {
  Rng rng(61);
  const int N = 5, C = 24, V = 37, Vp = 48;
  const Vec x = rng.normal(N * C, 1.0f), wte = rng.normal(Vp * C, 0.5f);
  Vec logits(N * Vp, kNaN);
  classifier_logits(logits.data(), x.data(), wte.data(), N, C, V, Vp);
  for (int n = 0; n < N; ++n)
    for (int j = 0; j < Vp; ++j) {
      const float got = logits[n * Vp + j];
      if (j >= V) {
        EXPECT_TRUE(std::isinf(got) && got < 0) << n << "," << j;
        continue;
      }
      double s = 0.0, mag = 0.0;
      for (int c = 0; c < C; ++c) {
        s += static_cast<double>(x[n * C + c]) * wte[j * C + c];
        mag += std::fabs(static_cast<double>(x[n * C + c]) * wte[j * C + c]);
      }
      EXPECT_NEAR(got, s, 1e-6 * (std::sqrt(C) + 2) * mag) << n << "," << j;
    }
}

TEST(Classifier, BitwiseIndependentOfThreads) {
  Rng rng(62);
  const int N = 20, C = 32, V = 300, Vp = 320, chunk = 7;
  const Vec x = rng.normal(N * C, 1.0f), wte = rng.normal(Vp * C, 0.5f);
  const std::vector<int> tgt = rng.ints(N, 0, V - 1);
  std::vector<Vec> res[3];
  for (int th = 1; th <= 3; ++th) {
    with_threads(th, [&] {
      Vec losses(N), dx(N * C), dwte(Vp * C, 0.0f), ws(classifier_workspace_floats(chunk, Vp));
      classifier_forward_backward(losses.data(), dx.data(), dwte.data(), x.data(), wte.data(),
                                  tgt.data(), N, C, V, Vp, 0.05f, ws.data(), chunk);
      res[th - 1] = {losses, dx, dwte};
    });
  }
  for (int th = 1; th < 3; ++th)
    for (size_t i = 0; i < res[0].size(); ++i)
      EXPECT_TRUE(same_bits(res[0][i], res[th][i])) << "output " << i;
}

// ---------------------------------------------------------------------------------------------
// adamw and gradient norm

TEST(AdamW, ThreeStepsMatchFp64) {
  Rng rng(70);
  const size_t n = 1013;
  Vec params = rng.normal(n, 1.0f), m(n, 0.0f), v(n, 0.0f);
  DVec pd = to_double(params), md(n, 0.0), vd(n, 0.0);
  DVec m_mag(n, 0.0);  // the same recurrence on |terms|: the scale of m's rounding error
  AdamWParams p{1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 0, 0.5f};
  for (int t = 1; t <= 3; ++t) {
    p.t = t;
    p.lr = 1e-3f * t;                                    // a schedule: the lr changes per step
    const Vec g = rng.normal(n, t == 2 ? 1e-4f : 1.0f);  // a step of tiny gradients too
    adamw_update(params.data(), m.data(), v.data(), g.data(), n, p);
    const double b1 = p.beta1, b2 = p.beta2, eps = p.eps, wd = p.weight_decay, lr = p.lr;
    DVec tol_p(n), tol_m(n), tol_v(n);
    for (size_t i = 0; i < n; ++i) {
      const double gi = static_cast<double>(g[i]) * p.grad_scale;
      md[i] = b1 * md[i] + (1 - b1) * gi;
      m_mag[i] = b1 * m_mag[i] + (1 - b1) * std::fabs(gi);
      vd[i] = b2 * vd[i] + (1 - b2) * gi * gi;
      const double bc1 = 1 - std::pow(b1, t), bc2 = 1 - std::pow(b2, t);
      const double mhat = md[i] / bc1, vhat = vd[i] / bc2;
      const double denom = std::sqrt(vhat) + eps;
      const double upd = mhat / denom + wd * pd[i];
      pd[i] -= lr * upd;
      // A few ulps per operation, accumulated over t steps.
      tol_m[i] = 1e-6 * m_mag[i];
      tol_v[i] = 1e-6 * vd[i];
      tol_p[i] =
          2e-7 * t * std::fabs(pd[i]) + lr * 1e-6 * (m_mag[i] / bc1 / denom + std::fabs(upd));
    }
    const std::string tag = " step " + std::to_string(t);
    expect_close(m, md, tol_m, "adamw m" + tag);
    expect_close(v, vd, tol_v, "adamw v" + tag);
    expect_close(params, pd, tol_p, "adamw params" + tag);
  }
  p.t = 0;
  EXPECT_THROW(adamw_update(params.data(), m.data(), v.data(), params.data(), n, p), Error);
}

TEST(GradNorm, SumSquaresMatchesFp64AndIsDeterministic) {
  Rng rng(80);
  for (size_t n : {size_t{0}, size_t{5}, size_t{4096}, size_t{3 * 4096 + 17}, size_t{100003}}) {
    const Vec g = rng.normal(n, 0.3f);
    long double want = 0.0L;
    for (float x : g) want += static_cast<long double>(x) * x;
    double got[3];
    for (int th = 1; th <= 3; ++th)
      with_threads(th, [&] { got[th - 1] = sum_squares(g.data(), n); });
    EXPECT_NEAR(got[0], static_cast<double>(want), 1e-13 * static_cast<double>(want) + 1e-300)
        << "n=" << n;
    EXPECT_EQ(std::memcmp(&got[0], &got[1], sizeof(double)), 0) << "n=" << n;
    EXPECT_EQ(std::memcmp(&got[0], &got[2], sizeof(double)), 0) << "n=" << n;
  }
}

TEST(GradNorm, ClipScale) {
  EXPECT_FLOAT_EQ(clip_scale(2.0, 1.0f), static_cast<float>(1.0 / (2.0 + 1e-6)));
  EXPECT_EQ(clip_scale(0.5, 1.0f), 1.0f);
  EXPECT_EQ(clip_scale(5.0, 0.0f), 1.0f);   // clipping off
  EXPECT_EQ(clip_scale(5.0, -1.0f), 1.0f);  // clipping off
  EXPECT_EQ(clip_scale(std::numeric_limits<double>::infinity(), 1.0f), 1.0f);
  EXPECT_EQ(clip_scale(std::numeric_limits<double>::quiet_NaN(), 1.0f), 1.0f);
}

}  // namespace
}  // namespace remat::cpu
