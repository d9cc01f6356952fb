// Linear layer on the CPU: both products go through sgemm; the bias reductions are summed per
// output channel over rows in order, so everything is deterministic.
#include "kernels/matmul.h"

#include <algorithm>

#include "kernels/common.h"
#include "kernels/gemm.h"

namespace remat::cpu {
namespace {

// Output channels per thread in the bias reduction.
constexpr int kBiasBlock = 64;

void check_shapes(const char* who, int N, int C, int OC) {
  REMAT_CHECK(N >= 0 && C > 0 && OC > 0, std::string(who) + ": bad shape N=" + std::to_string(N) +
                                             " C=" + std::to_string(C) +
                                             " OC=" + std::to_string(OC));
}

}  // namespace

void matmul_forward(float* out, const float* inp, const float* w, const float* bias, int N, int C,
                    int OC) {
  check_shapes("matmul_forward", N, C, OC);
  REMAT_CHECK(N == 0 || (out && inp && w), "matmul_forward: null pointer");
  // out (N, OC) = inp (N, C) @ w (OC, C)^T
  sgemm(Trans::kNo, Trans::kYes, N, OC, C, 1.0f, inp, C, w, C, 0.0f, out, OC);
  if (bias == nullptr) return;
#pragma omp parallel for schedule(static)
  for (int n = 0; n < N; ++n) {
    float* row = out + static_cast<long>(n) * OC;
    for (int o = 0; o < OC; ++o) row[o] += bias[o];
  }
}

void matmul_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                     const float* w, int N, int C, int OC) {
  check_shapes("matmul_backward", N, C, OC);
  REMAT_CHECK(dw != nullptr, "matmul_backward: dw is null");
  REMAT_CHECK(N == 0 || (dout && inp && w), "matmul_backward: null pointer");
  if (dinp != nullptr) {
    // dinp (N, C) = dout (N, OC) @ w (OC, C)
    sgemm(Trans::kNo, Trans::kNo, N, C, OC, 1.0f, dout, OC, w, C, 0.0f, dinp, C);
  }
  // dw (OC, C) += dout^T (OC, N) @ inp (N, C)
  sgemm(Trans::kYes, Trans::kNo, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dw, C);
  if (dbias == nullptr) return;
  // dbias (OC) += column sums of dout, each channel summed over n ascending in double.
  const int nblocks = (OC + kBiasBlock - 1) / kBiasBlock;
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < nblocks; ++blk) {
    const int o0 = blk * kBiasBlock;
    const int width = std::min(kBiasBlock, OC - o0);
    double sum[kBiasBlock] = {};
    for (int n = 0; n < N; ++n) {
      const float* row = dout + static_cast<long>(n) * OC + o0;
      for (int j = 0; j < width; ++j) sum[j] += row[j];
    }
    for (int j = 0; j < width; ++j) dbias[o0 + j] += static_cast<float>(sum[j]);
  }
}

}  // namespace remat::cpu
