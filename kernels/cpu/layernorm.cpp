// LayerNorm on the CPU. Row statistics are summed in double in channel order; the normalized
// value is then formed in float from the stored (float) mean and rstd, so the backward's
// recomputation of norm = (x - mean) * rstd sees exactly the forward's values.
#include "kernels/layernorm.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/common.h"

namespace remat::cpu {
namespace {

constexpr double kEps = 1e-5;
// Channels per thread in the dw/db reduction.
constexpr int kChannelBlock = 64;

void check_shape(const char* who, int N, int C) {
  REMAT_CHECK(N >= 0 && C > 0,
              std::string(who) + ": bad shape N=" + std::to_string(N) + " C=" + std::to_string(C));
}

// One row: out (C) = (x - mean) * rstd * w + b. The single routine both forward entry points
// use, which is what makes the fused path bitwise equal to the plain one.
void normalize_row(float* out, float* mean_out, float* rstd_out, const float* x, const float* w,
                   const float* b, int C) {
  double sum = 0.0;
  for (int c = 0; c < C; ++c) sum += x[c];
  const double m = sum / C;
  double sq = 0.0;
  for (int c = 0; c < C; ++c) {
    const double d = x[c] - m;
    sq += d * d;
  }
  const float mean = static_cast<float>(m);
  const float rstd = static_cast<float>(1.0 / std::sqrt(sq / C + kEps));
  for (int c = 0; c < C; ++c) out[c] = (x[c] - mean) * rstd * w[c] + b[c];
  if (mean_out) *mean_out = mean;
  if (rstd_out) *rstd_out = rstd;
}

}  // namespace

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* w,
                       const float* b, int N, int C) {
  check_shape("layernorm_forward", N, C);
  REMAT_CHECK(N == 0 || (out && inp && w && b), "layernorm_forward: null pointer");
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const long off = static_cast<long>(n) * C;
    normalize_row(out + off, mean ? mean + n : nullptr, rstd ? rstd + n : nullptr, inp + off, w, b,
                  C);
  }
}

void residual_layernorm_forward(float* residual, float* out, float* mean, float* rstd,
                                const float* x, const float* y, const float* w, const float* b,
                                int N, int C) {
  check_shape("residual_layernorm_forward", N, C);
  REMAT_CHECK(N == 0 || (residual && out && x && y && w && b),
              "residual_layernorm_forward: null pointer");
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const long off = static_cast<long>(n) * C;
    float* r = residual + off;
    for (int c = 0; c < C; ++c) r[c] = x[off + c] + y[off + c];
    normalize_row(out + off, mean ? mean + n : nullptr, rstd ? rstd + n : nullptr, r, w, b, C);
  }
}

void layernorm_backward(float* dinp, float* dw, float* db, const float* dout, const float* inp,
                        const float* w, const float* mean, const float* rstd, int N, int C) {
  check_shape("layernorm_backward", N, C);
  REMAT_CHECK(N == 0 || (dinp && dw && db && dout && inp && w && mean && rstd),
              "layernorm_backward: null pointer");
  // dinp: rows are independent.
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    const long off = static_cast<long>(n) * C;
    const float* x = inp + off;
    const float* dy = dout + off;
    const float m = mean[n];
    const float s = rstd[n];
    double sum_dnorm = 0.0;       // sum of dnorm = dout * w
    double sum_dnorm_norm = 0.0;  // sum of dnorm * norm
    for (int c = 0; c < C; ++c) {
      const float norm = (x[c] - m) * s;
      const float dnorm = dy[c] * w[c];
      sum_dnorm += dnorm;
      sum_dnorm_norm += static_cast<double>(dnorm) * norm;
    }
    const float mean_dnorm = static_cast<float>(sum_dnorm / C);
    const float mean_dnorm_norm = static_cast<float>(sum_dnorm_norm / C);
    float* dx = dinp + off;
    for (int c = 0; c < C; ++c) {
      const float norm = (x[c] - m) * s;
      const float dnorm = dy[c] * w[c];
      dx[c] += s * (dnorm - mean_dnorm - norm * mean_dnorm_norm);
    }
  }
  // dw, db: each channel slice summed by one thread over rows in order, in double.
  const int nblocks = (C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < nblocks; ++blk) {
    const int c0 = blk * kChannelBlock;
    const int width = std::min(kChannelBlock, C - c0);
    double sum_w[kChannelBlock] = {};
    double sum_b[kChannelBlock] = {};
    for (int n = 0; n < N; ++n) {
      const long off = static_cast<long>(n) * C + c0;
      const float m = mean[n];
      const float s = rstd[n];
      for (int j = 0; j < width; ++j) {
        const float norm = (inp[off + j] - m) * s;
        sum_w[j] += static_cast<double>(dout[off + j]) * norm;
        sum_b[j] += dout[off + j];
      }
    }
    for (int j = 0; j < width; ++j) {
      dw[c0 + j] += static_cast<float>(sum_w[j]);
      db[c0 + j] += static_cast<float>(sum_b[j]);
    }
  }
}

}  // namespace remat::cpu
