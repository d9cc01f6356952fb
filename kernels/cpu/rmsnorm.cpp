// RMSNorm on the CPU. Each row's sum of squares is accumulated in double in channel order;
// the normalized value is then formed in float from the stored (float) rstd, so the
// backward's recomputation of norm = x * rstd sees exactly the forward's values.
#include "kernels/rmsnorm.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/common.h"

namespace remat::cpu {
namespace {

// Channels per thread in the dw reduction.
constexpr int kChannelBlock = 64;

void check_shape(const char* who, int N, int C, float eps) {
  REMAT_CHECK(N >= 0 && C > 0 && eps >= 0.0f,
              std::string(who) + ": bad shape N=" + std::to_string(N) + " C=" + std::to_string(C) +
                  " eps=" + std::to_string(eps));
}

// One row: out (C) = x * rstd * w. The single routine both forward entry points use, which
// is what makes the fused path bitwise equal to the plain one.
void normalize_row(float* out, float* rstd_out, const float* x, const float* w, int C, float eps) {
  double sq = 0.0;
  for (int c = 0; c < C; ++c) sq += static_cast<double>(x[c]) * x[c];
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / C + static_cast<double>(eps)));
  for (int c = 0; c < C; ++c) out[c] = x[c] * rstd * w[c];
  if (rstd_out) *rstd_out = rstd;
}

}  // namespace

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* w, int N, int C,
                     float eps) {
  check_shape("rmsnorm_forward", N, C, eps);
  REMAT_CHECK(N == 0 || (out && inp && w), "rmsnorm_forward: null pointer");
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const long off = static_cast<long>(n) * C;
    normalize_row(out + off, rstd ? rstd + n : nullptr, inp + off, w, C, eps);
  }
}

void residual_rmsnorm_forward(float* residual, float* out, float* rstd, const float* x,
                              const float* y, const float* w, int N, int C, float eps) {
  check_shape("residual_rmsnorm_forward", N, C, eps);
  REMAT_CHECK(N == 0 || (residual && out && x && y && w), "residual_rmsnorm_forward: null pointer");
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const long off = static_cast<long>(n) * C;
    float* r = residual + off;
    for (int c = 0; c < C; ++c) r[c] = x[off + c] + y[off + c];
    normalize_row(out + off, rstd ? rstd + n : nullptr, r, w, C, eps);
  }
}

void rmsnorm_backward(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                      const float* rstd, int N, int C) {
  check_shape("rmsnorm_backward", N, C, 0.0f);
  REMAT_CHECK(N == 0 || (dinp && dw && dout && inp && w && rstd), "rmsnorm_backward: null pointer");
  // dinp: rows are independent. With norm = x * s and dnorm = dout * w,
  // dx = s * (dnorm - norm * mean(dnorm * norm)).
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const long off = static_cast<long>(n) * C;
    const float* x = inp + off;
    const float* dy = dout + off;
    const float s = rstd[n];
    double sum_dnorm_norm = 0.0;
    for (int c = 0; c < C; ++c) {
      const float norm = x[c] * s;
      const float dnorm = dy[c] * w[c];
      sum_dnorm_norm += static_cast<double>(dnorm) * norm;
    }
    const float mean_dnorm_norm = static_cast<float>(sum_dnorm_norm / C);
    float* dx = dinp + off;
    for (int c = 0; c < C; ++c) {
      const float norm = x[c] * s;
      const float dnorm = dy[c] * w[c];
      dx[c] += s * (dnorm - norm * mean_dnorm_norm);
    }
  }
  // dw: each channel slice summed by one thread over rows in order, in double.
  const int nblocks = (C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < nblocks; ++blk) {
    const int c0 = blk * kChannelBlock;
    const int width = std::min(kChannelBlock, C - c0);
    double sum_w[kChannelBlock] = {};
    for (int n = 0; n < N; ++n) {
      const long off = static_cast<long>(n) * C + c0;
      const float s = rstd[n];
      for (int j = 0; j < width; ++j) {
        const float norm = inp[off + j] * s;
        sum_w[j] += static_cast<double>(dout[off + j]) * norm;
      }
    }
    for (int j = 0; j < width; ++j) dw[c0 + j] += static_cast<float>(sum_w[j]);
  }
}

}  // namespace remat::cpu
