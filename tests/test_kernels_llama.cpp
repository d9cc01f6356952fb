// CPU reference kernels of the Llama family (RMSNorm, RoPE, SwiGLU, grouped-query attention)
// against fp64 references written here from the math. Each backward is checked twice: the
// fp64 analytic gradient against central differences of the fp64 forward, and the fp32
// kernel against that analytic gradient. Tolerances are error bounds in units of
// u = 2^-24 (fp32 unit roundoff): the count of roundings a result goes through, and for a
// sum of n terms n times the sum of the terms' magnitudes, computed beside each reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels/attention.h"
#include "kernels/common.h"
#include "kernels/rmsnorm.h"
#include "kernels/rope.h"
#include "kernels/swiglu.h"
#include "tests/kernel_test_util.h"

namespace remat::cpu {
namespace {

using namespace remat::cpu::test;  // NOLINT(google-build-using-namespace)

constexpr double kU = std::numeric_limits<float>::epsilon() / 2;  // fp32 unit roundoff
// Central differences of an fp64 forward with step h ~ 1e-4 on unit-scale inputs: truncation
// h^2/6 |f'''| and roundoff 1e-16 |L| / h are both near 1e-9; this leaves a wide margin and
// stays far below any real formula error.
constexpr double kFdRtol = 1e-6;

// Each got[i] within tol[i] of ref[i]; NaN never passes. Reports the first few misses.
template <class T>
void expect_close(const std::vector<T>& got, const DVec& ref, const DVec& tol,
                  const std::string& what) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  ASSERT_EQ(tol.size(), ref.size()) << what;
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

// Error bounds in units of u -> absolute tolerances (the floor covers exact zeros).
DVec tol_from(const DVec& bound_in_u) {
  DVec t(bound_in_u.size());
  for (size_t i = 0; i < t.size(); ++i) t[i] = kU * bound_in_u[i] + 1e-30;
  return t;
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

// The analytic fp64 gradient at idx against central differences of the fp64 forward.
void expect_matches_fd(const DVec& analytic, const DVec& numeric, const std::vector<size_t>& idx,
                       const std::string& what) {
  double scale = 0.0;
  for (double g : numeric) scale = std::max(scale, std::fabs(g));
  ASSERT_GT(scale, 0.0) << what << ": the numeric gradient is all zero, the check is vacuous";
  DVec got(idx.size());
  for (size_t i = 0; i < idx.size(); ++i) got[i] = analytic[idx[i]];
  expect_close(got, numeric, DVec(idx.size(), kFdRtol * scale), what);
}

double dot(const DVec& a, const DVec& r) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * r[i];
  return s;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsRef {
  DVec out, rstd;
};

RmsRef ref_rmsnorm(const DVec& x, const DVec& w, int N, int C, double eps) {
  RmsRef r{DVec(x.size()), DVec(N)};
  for (int n = 0; n < N; ++n) {
    double sq = 0.0;
    for (int c = 0; c < C; ++c) sq += x[n * C + c] * x[n * C + c];
    const double s = 1.0 / std::sqrt(sq / C + eps);
    for (int c = 0; c < C; ++c) r.out[n * C + c] = x[n * C + c] * s * w[c];
    r.rstd[n] = s;
  }
  return r;
}

// Gradient of sum(out * dout) and the fp32 kernel's error bounds (units of u).
struct RmsGrad {
  DVec dx, dw, dx_err, dw_err;
};

RmsGrad ref_rmsnorm_grad(const DVec& x, const DVec& w, const DVec& dout, int N, int C, double eps) {
  RmsGrad g{DVec(x.size()), DVec(C, 0.0), DVec(x.size()), DVec(C, 0.0)};
  const RmsRef f = ref_rmsnorm(x, w, N, C, eps);
  DVec dw_mag(C, 0.0);
  for (int n = 0; n < N; ++n) {
    const double s = f.rstd[n];
    double m = 0.0, m_abs = 0.0;  // mean(dnorm * norm), mean|dnorm * norm|
    for (int c = 0; c < C; ++c) {
      const double t = dout[n * C + c] * w[c] * x[n * C + c] * s;
      m += t;
      m_abs += std::fabs(t);
    }
    m /= C;
    m_abs /= C;
    for (int c = 0; c < C; ++c) {
      const size_t i = static_cast<size_t>(n) * C + c;
      const double norm = x[i] * s, dnorm = dout[i] * w[c];
      g.dx[i] = s * (dnorm - norm * m);
      // rstd rounded (1), norm (1) and dnorm (1) products, the mean of float terms (3 + 1),
      // norm * mean, the difference, the product with s and the += (1 each): 10; 12 for slack
      // in the bound's own rounding.
      g.dx_err[i] = 12 * std::fabs(s) * (std::fabs(dnorm) + std::fabs(norm) * m_abs);
      g.dw[c] += dout[i] * norm;
      // norm carries 2 roundings (rstd, product); the double sum is exact at this scale.
      dw_mag[c] += std::fabs(dout[i] * norm);
    }
  }
  for (int c = 0; c < C; ++c) g.dw_err[c] = 2 * dw_mag[c] + 2 * std::fabs(g.dw[c]);
  return g;
}

struct RmsSize {
  int N, C;
};

TEST(RmsNorm, ForwardMatchesFp64) {
  Rng rng(100);
  for (float eps : {1e-5f, 1e-6f})
    for (RmsSize s :
         {RmsSize{1, 1}, RmsSize{5, 24}, RmsSize{13, 7}, RmsSize{4, 768}, RmsSize{3, 1001}}) {
      const Vec x = rng.normal(s.N * s.C, 1.5f, 0.5f);
      const Vec w = rng.uniform(s.C, -1.5f, 1.5f);
      Vec out(x.size(), kNaN), rstd(s.N, kNaN);
      rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), s.N, s.C, eps);
      const RmsRef ref = ref_rmsnorm(to_double(x), to_double(w), s.N, s.C, eps);
      // out: rstd rounded once, then two float products: 3 roundings of the result.
      // rstd: one rounding (the statistics are in double).
      DVec bound(x.size()), bound_r(s.N);
      for (size_t i = 0; i < x.size(); ++i) bound[i] = 3 * std::fabs(ref.out[i]);
      for (int n = 0; n < s.N; ++n) bound_r[n] = ref.rstd[n];
      const std::string tag =
          " N=" + std::to_string(s.N) + " C=" + std::to_string(s.C) + " eps=" + std::to_string(eps);
      expect_close(out, ref.out, tol_from(bound), "rmsnorm out" + tag);
      expect_close(rstd, ref.rstd, tol_from(bound_r), "rmsnorm rstd" + tag);
      // rstd is optional and does not change out.
      Vec out2(x.size(), kNaN);
      rmsnorm_forward(out2.data(), nullptr, x.data(), w.data(), s.N, s.C, eps);
      EXPECT_TRUE(same_bits(out, out2)) << tag;
    }
}

TEST(RmsNorm, FusedResidualIsBitwiseEqualToAddThenNormalize) {
  Rng rng(101);
  for (RmsSize s : {RmsSize{1, 1}, RmsSize{5, 24}, RmsSize{13, 7}, RmsSize{4, 768}}) {
    const Vec x = rng.normal(s.N * s.C, 1.0f), y = rng.normal(s.N * s.C, 1.0f, 0.5f);
    const Vec w = rng.uniform(s.C, 0.5f, 1.5f);
    Vec res(x.size(), kNaN), out(x.size(), kNaN), rstd(s.N, kNaN);
    residual_rmsnorm_forward(res.data(), out.data(), rstd.data(), x.data(), y.data(), w.data(), s.N,
                             s.C, 1e-5f);
    Vec res2(x.size()), out2(x.size(), kNaN), rstd2(s.N, kNaN);
    for (size_t i = 0; i < x.size(); ++i) res2[i] = x[i] + y[i];
    rmsnorm_forward(out2.data(), rstd2.data(), res2.data(), w.data(), s.N, s.C, 1e-5f);
    const std::string tag = " N=" + std::to_string(s.N) + " C=" + std::to_string(s.C);
    EXPECT_TRUE(same_bits(res, res2)) << tag;
    EXPECT_TRUE(same_bits(out, out2)) << tag;
    EXPECT_TRUE(same_bits(rstd, rstd2)) << tag;
    Vec res3(x.size(), kNaN), out3(x.size(), kNaN);
    residual_rmsnorm_forward(res3.data(), out3.data(), nullptr, x.data(), y.data(), w.data(), s.N,
                             s.C, 1e-5f);
    EXPECT_TRUE(same_bits(res, res3) && same_bits(out, out3)) << "rstd optional" << tag;
  }
}

TEST(RmsNorm, BackwardMatchesFiniteDifferencesAndAccumulates) {
  Rng rng(102);
  for (float eps : {1e-5f, 1e-6f})
    for (RmsSize s :
         {RmsSize{1, 3}, RmsSize{5, 24}, RmsSize{13, 7}, RmsSize{3, 101}, RmsSize{70, 130}}) {
      const Vec x = rng.normal(s.N * s.C, 1.0f, 0.5f);
      const Vec w = rng.uniform(s.C, -1.5f, 1.5f), r = rng.uniform(x.size(), -1, 1);
      Vec out(x.size()), rstd(s.N);
      rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), s.N, s.C, eps);
      Vec dx(x.size(), 0.0f), dw(s.C, 0.0f);
      rmsnorm_backward(dx.data(), dw.data(), r.data(), x.data(), w.data(), rstd.data(), s.N, s.C);
      const DVec xd = to_double(x), wd = to_double(w), rd = to_double(r);
      const RmsGrad g = ref_rmsnorm_grad(xd, wd, rd, s.N, s.C, eps);
      const std::string tag =
          " N=" + std::to_string(s.N) + " C=" + std::to_string(s.C) + " eps=" + std::to_string(eps);
      const auto ix = rng.subset(x.size(), 150), iw = rng.subset(w.size(), 60);
      expect_matches_fd(
          g.dx,
          numeric_grad(
              [&](const DVec& v) { return dot(ref_rmsnorm(v, wd, s.N, s.C, eps).out, rd); }, xd, ix,
              1e-4),
          ix, "rmsnorm fp64 dinp vs differences" + tag);
      expect_matches_fd(
          g.dw,
          numeric_grad(
              [&](const DVec& v) { return dot(ref_rmsnorm(xd, v, s.N, s.C, eps).out, rd); }, wd, iw,
              1e-4),
          iw, "rmsnorm fp64 dw vs differences" + tag);
      expect_close(dx, g.dx, tol_from(g.dx_err), "rmsnorm dinp" + tag);
      expect_close(dw, g.dw, tol_from(g.dw_err), "rmsnorm dw" + tag);

      // Both outputs are `+=`. dw adds one finished float per channel (bitwise predictable);
      // dinp's add may fuse into an FMA, so it is held to the rounding of one add.
      const Vec dx0 = rng.uniform(x.size(), -1, 1), dw0 = rng.uniform(s.C, -1, 1);
      Vec dx2 = dx0, dw2 = dw0;
      rmsnorm_backward(dx2.data(), dw2.data(), r.data(), x.data(), w.data(), rstd.data(), s.N, s.C);
      DVec want_x(x.size()), bound_x(x.size());
      for (size_t i = 0; i < x.size(); ++i) {
        want_x[i] = static_cast<double>(dx0[i]) + dx[i];
        bound_x[i] = 2 * (std::fabs(dx0[i]) + std::fabs(dx[i]));
      }
      expect_close(dx2, want_x, tol_from(bound_x), "rmsnorm dinp accumulates" + tag);
      Vec want_w = dw0;
      for (int c = 0; c < s.C; ++c) want_w[c] += dw[c];
      EXPECT_TRUE(same_bits(dw2, want_w)) << "rmsnorm dw accumulates" << tag;
    }
}

// ---------------------------------------------------------------------------------------------
// RoPE

struct RopeShape {
  int B, T, NH, NKV, HD;
  float theta;
  int width() const { return (NH + 2 * NKV) * HD; }
  size_t size() const { return static_cast<size_t>(B) * T * width(); }
  std::string tag() const {
    return " B=" + std::to_string(B) + " T=" + std::to_string(T) + " NH=" + std::to_string(NH) +
           " NKV=" + std::to_string(NKV) + " HD=" + std::to_string(HD) +
           " theta=" + std::to_string(theta);
  }
};

// The header fixes the angle in fp32 (inverse frequency, then the product with t), as
// Hugging Face computes it; everything after the angle is fp64 here.
float rope_angle(int t, int i, int HD, float theta) {
  const float inv_freq = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(HD));
  return static_cast<float>(t) * inv_freq;
}

// y = R(angle) x on q and k heads (R^T when transpose), v copied; err: the fp32 kernel's bound
// (units of u): cos and sin rounded once each, two products and a difference.
DVec ref_rope(const DVec& x, const RopeShape& s, bool transpose, DVec* err = nullptr) {
  DVec y(x.size());
  if (err) err->assign(x.size(), 0.0);
  const int half = s.HD / 2, W = s.width();
  const double sign = transpose ? -1.0 : 1.0;
  for (int b = 0; b < s.B; ++b)
    for (int t = 0; t < s.T; ++t) {
      const size_t row = (static_cast<size_t>(b) * s.T + t) * W;
      for (int h = 0; h < s.NH + 2 * s.NKV; ++h)
        for (int i = 0; i < half; ++i) {
          const size_t lo = row + h * s.HD + i, hi = lo + half;
          if (h >= s.NH + s.NKV) {  // v
            y[lo] = x[lo];
            y[hi] = x[hi];
            continue;
          }
          const double angle = rope_angle(t, i, s.HD, s.theta);
          const double c = std::cos(angle), sn = sign * std::sin(angle);
          y[lo] = x[lo] * c - x[hi] * sn;
          y[hi] = x[hi] * c + x[lo] * sn;
          if (err) {
            const double terms = std::fabs(x[lo] * c) + std::fabs(x[hi] * sn);
            const double terms_hi = std::fabs(x[hi] * c) + std::fabs(x[lo] * sn);
            (*err)[lo] = 2 * terms + std::fabs(y[lo]);
            (*err)[hi] = 2 * terms_hi + std::fabs(y[hi]);
          }
        }
    }
  return y;
}

const RopeShape kRopeShapes[] = {
    {1, 1, 1, 1, 2, 10000.0f}, {2, 7, 4, 2, 8, 10000.0f},  {1, 40, 4, 1, 64, 10000.0f},
    {2, 40, 2, 2, 64, 1e6f},   {1, 33, 3, 1, 6, 1e6f},     {3, 17, 8, 4, 16, 500000.0f},
    {1, 40, 2, 1, 128, 1e6f},  {2, 40, 4, 4, 8, 10000.0f},
};

// The v part of every row, bitwise equal between a and b.
void expect_v_copied(const Vec& a, const Vec& b, const RopeShape& s, const std::string& what) {
  const int W = s.width(), v0 = (s.NH + s.NKV) * s.HD;
  for (int row = 0; row < s.B * s.T; ++row)
    ASSERT_EQ(
        std::memcmp(a.data() + static_cast<size_t>(row) * W + v0,
                    b.data() + static_cast<size_t>(row) * W + v0, sizeof(float) * s.NKV * s.HD),
        0)
        << what << " row " << row;
}

TEST(Rope, ForwardMatchesFp64AndCopiesV) {
  Rng rng(110);
  for (const RopeShape& s : kRopeShapes) {
    const Vec x = rng.normal(s.size(), 1.0f);
    Vec out(x.size(), kNaN);
    rope_forward(out.data(), x.data(), s.B, s.T, s.NH, s.NKV, s.HD, s.theta);
    DVec err;
    const DVec ref = ref_rope(to_double(x), s, false, &err);
    expect_close(out, ref, tol_from(err), "rope_forward" + s.tag());
    expect_v_copied(out, x, s, "rope_forward v" + s.tag());
    // Position 0 is the identity (cos 0 = 1, sin 0 = 0 exactly).
    for (int b = 0; b < s.B; ++b) {
      const size_t row = static_cast<size_t>(b) * s.T * s.width();
      EXPECT_EQ(std::memcmp(out.data() + row, x.data() + row, sizeof(float) * s.width()), 0)
          << "t=0 changed" << s.tag();
    }
  }
}

TEST(Rope, BackwardIsTheTransposeAndMatchesFiniteDifferences) {
  Rng rng(111);
  for (const RopeShape& s : kRopeShapes) {
    const Vec x = rng.normal(s.size(), 1.0f), r = rng.uniform(s.size(), -1, 1);
    Vec dx(x.size(), kNaN);
    rope_backward(dx.data(), r.data(), s.B, s.T, s.NH, s.NKV, s.HD, s.theta);
    // L = sum(rope(x) * r): dL/dx = R^T r, independent of x (rope is linear).
    DVec err;
    const DVec rd = to_double(r);
    const DVec g = ref_rope(rd, s, true, &err);
    const auto idx = rng.subset(x.size(), 200);
    expect_matches_fd(g,
                      numeric_grad([&](const DVec& v) { return dot(ref_rope(v, s, false), rd); },
                                   to_double(x), idx, 1e-4),
                      idx, "rope fp64 transpose vs differences" + s.tag());
    expect_close(dx, g, tol_from(err), "rope_backward" + s.tag());
    expect_v_copied(dx, r, s, "rope_backward v" + s.tag());
  }
}

TEST(Rope, BackwardOfForwardIsTheIdentity) {
  Rng rng(112);
  for (const RopeShape& s : kRopeShapes) {
    const Vec x = rng.normal(s.size(), 1.0f);
    Vec y(x.size(), kNaN), back(x.size(), kNaN);
    rope_forward(y.data(), x.data(), s.B, s.T, s.NH, s.NKV, s.HD, s.theta);
    rope_backward(back.data(), y.data(), s.B, s.T, s.NH, s.NKV, s.HD, s.theta);
    // Each rotation is within 3u (|a| + |b|) per component; R^T applied to the first one's
    // error at most doubles it, the second adds 3 sqrt(2) u (|a| + |b|), and R_f^T R_f - I
    // (float cos and sin) 2u |x|: below 13u (|a| + |b|).
    const int half = s.HD / 2;
    DVec bound(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
      const size_t in_head = i % s.HD;
      const size_t partner = in_head < static_cast<size_t>(half) ? i + half : i - half;
      bound[i] = 13 * (std::fabs(x[i]) + std::fabs(x[partner]));
    }
    expect_close(back, to_double(x), tol_from(bound), "rope round trip" + s.tag());
    expect_v_copied(back, x, s, "rope round trip v" + s.tag());
  }
}

// ---------------------------------------------------------------------------------------------
// SwiGLU

double ref_sigmoid(double g) {
  return 1.0 / (1.0 + std::exp(-g));
}

// out (N, I) = silu(gate) * up.
DVec ref_swiglu(const DVec& inp, int N, int I) {
  DVec out(static_cast<size_t>(N) * I);
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < I; ++i) {
      const double g = inp[2L * I * n + i], u = inp[2L * I * n + I + i];
      out[static_cast<size_t>(n) * I + i] = g * ref_sigmoid(g) * u;
    }
  return out;
}

// Gates across the range, with the tails where exp overflows or sigmoid saturates.
Vec swiglu_input(Rng& rng, int N, int I) {
  Vec inp = rng.uniform(2L * N * I, -8, 8);
  const float tails[] = {0.0f, -0.0f, 30.0f, -30.0f, 95.0f, -95.0f, 1e-3f, -1e-3f};
  for (int n = 0; n < N; ++n)
    for (int i = 0; i < I; i += 7) inp[2L * I * n + i] = tails[(n + i) % 8];
  return inp;
}

TEST(SwiGlu, ForwardMatchesFp64) {
  Rng rng(120);
  for (RmsSize s : {RmsSize{1, 1}, RmsSize{3, 7}, RmsSize{17, 100}, RmsSize{64, 513}}) {
    const int N = s.N, I = s.C;
    const Vec inp = swiglu_input(rng, N, I);
    Vec out(static_cast<size_t>(N) * I, kNaN);
    swiglu_forward(out.data(), inp.data(), N, I);
    const DVec ref = ref_swiglu(to_double(inp), N, I);
    // expf within 1 ulp (2u), 1 + e, the quotient and the product with up: 5u; 6 for slack.
    DVec bound(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) bound[i] = 6 * std::fabs(ref[i]);
    expect_close(out, ref, tol_from(bound),
                 "swiglu_forward N=" + std::to_string(N) + " I=" + std::to_string(I));
  }
}

TEST(SwiGlu, BackwardMatchesFiniteDifferencesAndFp64) {
  Rng rng(121);
  for (RmsSize s : {RmsSize{1, 1}, RmsSize{3, 7}, RmsSize{17, 100}, RmsSize{64, 513}}) {
    const int N = s.N, I = s.C;
    const Vec inp = swiglu_input(rng, N, I);
    const Vec dout = rng.uniform(static_cast<size_t>(N) * I, -1, 1);
    Vec dinp(inp.size(), kNaN);
    swiglu_backward(dinp.data(), inp.data(), dout.data(), N, I);
    const DVec xd = to_double(inp), rd = to_double(dout);
    DVec g(inp.size()), bound(inp.size());
    for (int n = 0; n < N; ++n)
      for (int i = 0; i < I; ++i) {
        const size_t gi = 2L * I * n + i, ui = gi + I, o = static_cast<size_t>(n) * I + i;
        const double gate = xd[gi], up = xd[ui], sg = ref_sigmoid(gate), d = rd[o];
        g[gi] = d * up * sg * (1 + gate * (1 - sg));
        g[ui] = d * gate * sg;
        // sigmoid: expf (2u), 1 + e, the reciprocal: 4u relative; 1 - s then carries 4u
        // absolute, which g amplifies. Products and sums: 4 more.
        bound[gi] = 10 * std::fabs(d * up) * sg * (1 + std::fabs(gate) * (1 + (1 - sg)));
        bound[ui] = 7 * std::fabs(g[ui]);
      }
    const std::string tag = " N=" + std::to_string(N) + " I=" + std::to_string(I);
    // Away from the saturated tails, where a step of 1e-4 sees no change in fp64 either.
    std::vector<size_t> idx;
    for (size_t i : rng.subset(inp.size(), 300))
      if (std::fabs(xd[i]) < 20) idx.push_back(i);
    expect_matches_fd(
        g, numeric_grad([&](const DVec& v) { return dot(ref_swiglu(v, N, I), rd); }, xd, idx, 1e-4),
        idx, "swiglu fp64 dinp vs differences" + tag);
    expect_close(dinp, g, tol_from(bound), "swiglu_backward" + tag);
  }
}

// ---------------------------------------------------------------------------------------------
// Grouped-query attention

struct GqaShape {
  int B, T, C, NH, NKV;
  int HD() const { return C / NH; }
  int width() const { return C + 2 * NKV * HD(); }
  size_t size() const { return static_cast<size_t>(B) * T * width(); }
  std::string tag() const {
    return " B=" + std::to_string(B) + " T=" + std::to_string(T) + " C=" + std::to_string(C) +
           " NH=" + std::to_string(NH) + " NKV=" + std::to_string(NKV);
  }
};

// qkv (B, T, C + 2 NKV HD) -> (B, T, 3C) with key/value head h / (NH / NKV) copied into head h.
DVec expand_kv(const DVec& qkv, const GqaShape& s) {
  const int HD = s.HD(), G = s.NH / s.NKV, W = s.width();
  DVec e(static_cast<size_t>(s.B) * s.T * 3 * s.C);
  for (int bt = 0; bt < s.B * s.T; ++bt) {
    const double* src = &qkv[static_cast<size_t>(bt) * W];
    double* dst = &e[static_cast<size_t>(bt) * 3 * s.C];
    for (int c = 0; c < s.C; ++c) dst[c] = src[c];
    for (int h = 0; h < s.NH; ++h)
      for (int c = 0; c < HD; ++c) {
        dst[s.C + h * HD + c] = src[s.C + (h / G) * HD + c];
        dst[2 * s.C + h * HD + c] = src[s.C + s.NKV * HD + (h / G) * HD + c];
      }
  }
  return e;
}

// The transpose of expand_kv: a key/value head's gradient sums those of its query heads.
DVec reduce_kv(const DVec& e, const GqaShape& s) {
  const int HD = s.HD(), G = s.NH / s.NKV, W = s.width();
  DVec r(s.size(), 0.0);
  for (int bt = 0; bt < s.B * s.T; ++bt) {
    const double* src = &e[static_cast<size_t>(bt) * 3 * s.C];
    double* dst = &r[static_cast<size_t>(bt) * W];
    for (int c = 0; c < s.C; ++c) dst[c] = src[c];
    for (int h = 0; h < s.NH; ++h)
      for (int c = 0; c < HD; ++c) {
        dst[s.C + (h / G) * HD + c] += src[s.C + h * HD + c];
        dst[s.C + s.NKV * HD + (h / G) * HD + c] += src[2 * s.C + h * HD + c];
      }
  }
  return r;
}

// Causal attention on expanded qkv (B, T, 3C) in fp64, with the fp32 kernel's error bounds in
// units of u. A score is a sum of HD products (HD * sum|q k| absolute); the log-sum-exp
// inherits the largest score's error twice and the T-term sum's; a probability's relative
// error is its score's plus the log-sum-exp's plus a few roundings; every sum of n terms adds
// n times the sum of its terms' magnitudes. acc_len: terms per key gradient element (T times
// the group size). With dout, also the gradient of sum(out * dout).
struct AttnRef {
  DVec out, lse, out_err, lse_err;
  DVec dqkv, dqkv_err;
};

AttnRef ref_attention(const DVec& e, int B, int T, int C, int NH, const DVec* dout = nullptr,
                      int acc_len = 0) {
  const int HD = C / NH;
  const double scale = 1.0 / std::sqrt(static_cast<double>(HD));
  const size_t n_out = static_cast<size_t>(B) * T * C;
  AttnRef r{DVec(n_out),      DVec(static_cast<size_t>(B) * NH * T),
            DVec(n_out, 0.0), DVec(static_cast<size_t>(B) * NH * T),
            DVec(),           DVec()};
  if (dout) {
    r.dqkv.assign(e.size(), 0.0);
    r.dqkv_err.assign(e.size(), 0.0);
  }
  DVec s(T), smag(T), p(T), prel(T), dp(T), dpmag(T), ds(T), ds_err(T);
  auto at = [&](int b, int t) { return (static_cast<size_t>(b) * T + t) * 3 * C; };
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < NH; ++h)
      for (int t = 0; t < T; ++t) {
        const double* q = &e[at(b, t) + h * HD];
        double m = -1e300, smax = 0.0;
        for (int j = 0; j <= t; ++j) {
          const double* k = &e[at(b, j) + C + h * HD];
          double sum = 0.0, mag = 0.0;
          for (int c = 0; c < HD; ++c) {
            sum += q[c] * k[c];
            mag += std::fabs(q[c] * k[c]);
          }
          s[j] = sum * scale;
          smag[j] = mag * scale;
          m = std::max(m, s[j]);
          smax = std::max(smax, smag[j]);
        }
        double sum = 0.0;
        for (int j = 0; j <= t; ++j) sum += std::exp(s[j] - m);
        const double lse = m + std::log(sum);
        const size_t li = (static_cast<size_t>(b) * NH + h) * T + t;
        r.lse[li] = lse;
        r.lse_err[li] = 3 * HD * smax + T + 4 + std::fabs(lse);
        for (int j = 0; j <= t; ++j) {
          p[j] = std::exp(s[j] - lse);
          prel[j] = HD * smag[j] + r.lse_err[li] + std::fabs(s[j] - m) + std::fabs(s[j] - lse) + 4;
        }
        double* o = &r.out[static_cast<size_t>(b * T + t) * C + h * HD];
        double* oe = &r.out_err[static_cast<size_t>(b * T + t) * C + h * HD];
        for (int j = 0; j <= t; ++j) {
          const double* v = &e[at(b, j) + 2 * C + h * HD];
          for (int c = 0; c < HD; ++c) {
            o[c] += p[j] * v[c];
            oe[c] += p[j] * std::fabs(v[c]) * (prel[j] + T + 2);
          }
        }
        if (!dout) continue;
        const double* dy = &(*dout)[static_cast<size_t>(b * T + t) * C + h * HD];
        double D = 0.0, D_err = 0.0;
        for (int c = 0; c < HD; ++c) {
          D += dy[c] * o[c];
          D_err += HD * std::fabs(dy[c] * o[c]) + std::fabs(dy[c]) * oe[c];
        }
        D_err += std::fabs(D);
        for (int j = 0; j <= t; ++j) {
          const double* v = &e[at(b, j) + 2 * C + h * HD];
          dp[j] = 0.0;
          dpmag[j] = 0.0;
          for (int c = 0; c < HD; ++c) {
            dp[j] += dy[c] * v[c];
            dpmag[j] += std::fabs(dy[c] * v[c]);
          }
          ds[j] = p[j] * (dp[j] - D);
          ds_err[j] = p[j] * (HD * dpmag[j] + D_err + std::fabs(dp[j] - D)) +
                      std::fabs(ds[j]) * (prel[j] + 2);
        }
        double* dq = &r.dqkv[at(b, t) + h * HD];
        double* dq_err = &r.dqkv_err[at(b, t) + h * HD];
        for (int j = 0; j <= t; ++j) {
          const double* k = &e[at(b, j) + C + h * HD];
          double* dk = &r.dqkv[at(b, j) + C + h * HD];
          double* dk_err = &r.dqkv_err[at(b, j) + C + h * HD];
          double* dv = &r.dqkv[at(b, j) + 2 * C + h * HD];
          double* dv_err = &r.dqkv_err[at(b, j) + 2 * C + h * HD];
          for (int c = 0; c < HD; ++c) {
            dq[c] += scale * ds[j] * k[c];
            dq_err[c] += scale * (ds_err[j] + (T + 2) * std::fabs(ds[j])) * std::fabs(k[c]);
            dk[c] += scale * ds[j] * q[c];
            dk_err[c] += scale * (ds_err[j] + (acc_len + 2) * std::fabs(ds[j])) * std::fabs(q[c]);
            dv[c] += p[j] * dy[c];
            dv_err[c] += p[j] * (prel[j] + acc_len + 2) * std::fabs(dy[c]);
          }
        }
      }
  return r;
}

const GqaShape kGqaShapes[] = {
    {1, 1, 8, 4, 1},   {2, 7, 32, 4, 1},  {2, 7, 32, 4, 2},  {2, 7, 32, 4, 4},
    {1, 33, 64, 4, 1}, {1, 33, 64, 4, 2}, {1, 20, 24, 4, 4}, {2, 40, 64, 4, 2},
};

TEST(GqaAttention, ForwardMatchesExpandedFp64) {
  Rng rng(130);
  for (const GqaShape& s : kGqaShapes) {
    const Vec qkv = rng.normal(s.size(), 1.0f);
    Vec out(static_cast<size_t>(s.B) * s.T * s.C, kNaN), lse(s.B * s.NH * s.T, kNaN);
    attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, s.C, s.NH, s.NKV);
    const AttnRef ref = ref_attention(expand_kv(to_double(qkv), s), s.B, s.T, s.C, s.NH);
    expect_close(out, ref.out, tol_from(ref.out_err), "gqa out" + s.tag());
    expect_close(lse, ref.lse, tol_from(ref.lse_err), "gqa lse" + s.tag());
  }
}

TEST(GqaAttention, BackwardMatchesFiniteDifferencesAndFp64) {
  Rng rng(131);
  for (const GqaShape& s : kGqaShapes) {
    if (s.T > 33) continue;  // the differences cost T^2 per step
    const Vec qkv = rng.normal(s.size(), 1.0f);
    const Vec r = rng.uniform(static_cast<size_t>(s.B) * s.T * s.C, -1, 1);
    Vec out(r.size()), lse(s.B * s.NH * s.T), dqkv(s.size(), kNaN);
    attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, s.C, s.NH, s.NKV);
    attention_backward(dqkv.data(), r.data(), qkv.data(), out.data(), lse.data(), s.B, s.T, s.C,
                       s.NH, s.NKV);
    const DVec xd = to_double(qkv), rd = to_double(r);
    const AttnRef ref =
        ref_attention(expand_kv(xd, s), s.B, s.T, s.C, s.NH, &rd, s.T * (s.NH / s.NKV));
    const DVec g = reduce_kv(ref.dqkv, s), g_err = reduce_kv(ref.dqkv_err, s);
    const auto idx = rng.subset(s.size(), 300);
    expect_matches_fd(g,
                      numeric_grad(
                          [&](const DVec& x) {
                            return dot(ref_attention(expand_kv(x, s), s.B, s.T, s.C, s.NH).out, rd);
                          },
                          xd, idx, 1e-4),
                      idx, "gqa fp64 dqkv vs differences" + s.tag());
    expect_close(dqkv, g, tol_from(g_err), "gqa dqkv" + s.tag());
  }
}

TEST(GqaAttention, FullHeadCountIsBitwiseTheDefault) {
  Rng rng(132);
  for (const GqaShape& s : kGqaShapes) {
    if (s.NKV != s.NH) continue;
    const Vec qkv = rng.normal(s.size(), 1.0f);
    const Vec dout = rng.uniform(static_cast<size_t>(s.B) * s.T * s.C, -1, 1);
    std::vector<Vec> res[2];
    for (int nkv : {0, s.NH}) {
      Vec out(dout.size(), kNaN), lse(s.B * s.NH * s.T, kNaN), dqkv(s.size(), kNaN);
      attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, s.C, s.NH, nkv);
      attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B, s.T,
                         s.C, s.NH, nkv);
      res[nkv == 0 ? 0 : 1] = {out, lse, dqkv};
    }
    for (size_t i = 0; i < res[0].size(); ++i)
      EXPECT_TRUE(same_bits(res[0][i], res[1][i])) << "output " << i << s.tag();
  }
}

// Grouping changes where k and v are read and how their gradients are summed, nothing else:
// out, lse and dq are bitwise those of full multi-head attention on the expanded qkv.
TEST(GqaAttention, QueryPathBitwiseEqualToExpandedMultiHead) {
  Rng rng(133);
  for (const GqaShape& s : kGqaShapes) {
    if (s.NKV == s.NH) continue;
    const Vec qkv = rng.normal(s.size(), 1.0f);
    const DVec e = expand_kv(to_double(qkv), s);
    const Vec qkv_full(e.begin(), e.end());
    const Vec dout = rng.uniform(static_cast<size_t>(s.B) * s.T * s.C, -1, 1);
    Vec out(dout.size(), kNaN), lse(s.B * s.NH * s.T, kNaN), dqkv(s.size(), kNaN);
    Vec out_f(dout.size(), kNaN), lse_f(lse.size(), kNaN), dqkv_f(qkv_full.size(), kNaN);
    attention_forward(out.data(), lse.data(), qkv.data(), s.B, s.T, s.C, s.NH, s.NKV);
    attention_backward(dqkv.data(), dout.data(), qkv.data(), out.data(), lse.data(), s.B, s.T, s.C,
                       s.NH, s.NKV);
    attention_forward(out_f.data(), lse_f.data(), qkv_full.data(), s.B, s.T, s.C, s.NH);
    attention_backward(dqkv_f.data(), dout.data(), qkv_full.data(), out_f.data(), lse_f.data(), s.B,
                       s.T, s.C, s.NH);
    EXPECT_TRUE(same_bits(out, out_f)) << s.tag();
    EXPECT_TRUE(same_bits(lse, lse_f)) << s.tag();
    for (int bt = 0; bt < s.B * s.T; ++bt)
      ASSERT_EQ(std::memcmp(dqkv.data() + static_cast<size_t>(bt) * s.width(),
                            dqkv_f.data() + static_cast<size_t>(bt) * 3 * s.C, sizeof(float) * s.C),
                0)
          << "dq row " << bt << s.tag();
  }
}

// ---------------------------------------------------------------------------------------------
// Determinism and shape checks

TEST(LlamaKernels, BitwiseIndependentOfThreads) {
  Rng rng(140);
  const int N = 50, C = 200, I = 96;
  const RopeShape rs{2, 30, 4, 2, 16, 10000.0f};
  const GqaShape gs{2, 24, 64, 4, 2};
  const Vec x = rng.normal(N * C, 1.0f), w = rng.uniform(C, 0.5f, 1.5f);
  const Vec dx_in = rng.uniform(N * C, -1, 1);
  const Vec sw = rng.normal(2 * N * I, 2.0f), dsw = rng.uniform(N * I, -1, 1);
  const Vec rx = rng.normal(rs.size(), 1.0f);
  const Vec qkv = rng.normal(gs.size(), 1.0f);
  const Vec dy = rng.uniform(static_cast<size_t>(gs.B) * gs.T * gs.C, -1, 1);
  std::vector<Vec> res[3];
  for (int th = 1; th <= 3; ++th) {
    with_threads(th, [&] {
      Vec out(N * C), rstd(N), dx(N * C, 0.0f), dw(C, 0.0f);
      rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f);
      rmsnorm_backward(dx.data(), dw.data(), dx_in.data(), x.data(), w.data(), rstd.data(), N, C);
      Vec so(N * I), sd(2 * N * I);
      swiglu_forward(so.data(), sw.data(), N, I);
      swiglu_backward(sd.data(), sw.data(), dsw.data(), N, I);
      Vec ro(rs.size()), rb(rs.size());
      rope_forward(ro.data(), rx.data(), rs.B, rs.T, rs.NH, rs.NKV, rs.HD, rs.theta);
      rope_backward(rb.data(), rx.data(), rs.B, rs.T, rs.NH, rs.NKV, rs.HD, rs.theta);
      Vec ao(dy.size()), lse(gs.B * gs.NH * gs.T), dqkv(gs.size());
      attention_forward(ao.data(), lse.data(), qkv.data(), gs.B, gs.T, gs.C, gs.NH, gs.NKV);
      attention_backward(dqkv.data(), dy.data(), qkv.data(), ao.data(), lse.data(), gs.B, gs.T,
                         gs.C, gs.NH, gs.NKV);
      res[th - 1] = {out, rstd, dx, dw, so, sd, ro, rb, ao, lse, dqkv};
    });
  }
  for (int th = 1; th < 3; ++th)
    for (size_t i = 0; i < res[0].size(); ++i)
      EXPECT_TRUE(same_bits(res[0][i], res[th][i])) << "output " << i << " threads " << th + 1;
}

TEST(LlamaKernels, BadShapesThrow) {
  Vec a(4096, 0.0f), b(4096, 0.0f), c(4096, 0.0f), d(64, 0.0f);
  // RMSNorm: no channels, negative rows, negative eps.
  EXPECT_THROW(rmsnorm_forward(a.data(), d.data(), b.data(), c.data(), 2, 0, 1e-5f), Error);
  EXPECT_THROW(rmsnorm_forward(a.data(), d.data(), b.data(), c.data(), -1, 4, 1e-5f), Error);
  EXPECT_THROW(rmsnorm_forward(a.data(), d.data(), b.data(), c.data(), 2, 4, -1.0f), Error);
  EXPECT_THROW(residual_rmsnorm_forward(a.data(), b.data(), d.data(), c.data(), c.data(), c.data(),
                                        2, 0, 1e-5f),
               Error);
  EXPECT_THROW(rmsnorm_backward(a.data(), d.data(), b.data(), c.data(), c.data(), d.data(), 2, 0),
               Error);
  EXPECT_THROW(rmsnorm_forward(nullptr, nullptr, b.data(), c.data(), 2, 4, 1e-5f), Error);
  // RoPE: odd head dim, no kv heads, no query heads, theta <= 0, aliasing.
  EXPECT_THROW(rope_forward(a.data(), b.data(), 1, 2, 2, 1, 7, 1e4f), Error);
  EXPECT_THROW(rope_forward(a.data(), b.data(), 1, 2, 2, 0, 8, 1e4f), Error);
  EXPECT_THROW(rope_forward(a.data(), b.data(), 1, 2, 0, 1, 8, 1e4f), Error);
  EXPECT_THROW(rope_forward(a.data(), b.data(), 1, 2, 2, 1, 8, 0.0f), Error);
  EXPECT_THROW(rope_backward(a.data(), b.data(), 1, 2, 2, 1, 0, 1e4f), Error);
  EXPECT_THROW(rope_forward(a.data(), a.data(), 1, 2, 2, 1, 8, 1e4f), Error);
  EXPECT_THROW(rope_backward(a.data(), a.data(), 1, 2, 2, 1, 8, 1e4f), Error);
  // SwiGLU: no columns, negative rows.
  EXPECT_THROW(swiglu_forward(a.data(), b.data(), 2, 0), Error);
  EXPECT_THROW(swiglu_backward(a.data(), b.data(), c.data(), -1, 4), Error);
  // Attention: NH not a multiple of NKV, NKV > NH, negative NKV.
  EXPECT_THROW(attention_forward(a.data(), b.data(), c.data(), 1, 4, 32, 4, 3), Error);
  EXPECT_THROW(attention_forward(a.data(), b.data(), c.data(), 1, 4, 32, 4, 8), Error);
  EXPECT_THROW(attention_forward(a.data(), b.data(), c.data(), 1, 4, 32, 4, -2), Error);
  EXPECT_THROW(attention_backward(a.data(), b.data(), c.data(), a.data(), b.data(), 1, 4, 32, 4, 3),
               Error);
  EXPECT_THROW(
      attention_backward(a.data(), b.data(), c.data(), a.data(), b.data(), 1, 4, 32, 4, -4), Error);
  // Empty batches are no-ops.
  rmsnorm_forward(nullptr, nullptr, nullptr, nullptr, 0, 4, 1e-5f);
  rope_forward(nullptr, nullptr, 0, 4, 2, 1, 8, 1e4f);
  swiglu_forward(nullptr, nullptr, 0, 4);
  attention_forward(nullptr, nullptr, nullptr, 0, 4, 32, 4, 2);
}

}  // namespace
}  // namespace remat::cpu
