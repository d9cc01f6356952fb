// Gradient norm on the CPU. sum_squares splits g into fixed 4096-element blocks; a block is
// summed in double by 8 interleaved lanes (lane l takes elements l, l+8, ... in order) that are
// then added in lane order; block sums are added in block order. The result depends only on n.
#include "kernels/gradnorm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/common.h"

namespace remat::cpu {
namespace {

constexpr size_t kBlock = 4096;
constexpr int kLanes = 8;

double block_sum_squares(const float* g, size_t n) {
  double lane[kLanes] = {};
  size_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const double x = g[i + l];
      lane[l] += x * x;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const double x = g[i];
    lane[l] += x * x;
  }
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  return sum;
}

}  // namespace

double sum_squares(const float* g, size_t n) {
  REMAT_CHECK(n == 0 || g != nullptr, "sum_squares: null pointer");
  const long nblocks = static_cast<long>((n + kBlock - 1) / kBlock);
  std::vector<double> partial(nblocks);
#pragma omp parallel for schedule(static) if (nblocks > 1)
  for (long blk = 0; blk < nblocks; ++blk) {
    const size_t start = static_cast<size_t>(blk) * kBlock;
    partial[blk] = block_sum_squares(g + start, std::min(kBlock, n - start));
  }
  double total = 0.0;
  for (long blk = 0; blk < nblocks; ++blk) total += partial[blk];
  return total;
}

float clip_scale(double norm, float max_norm) {
  if (max_norm <= 0.0f || !std::isfinite(norm)) return 1.0f;
  return static_cast<float>(std::min(1.0, max_norm / (norm + 1e-6)));
}

}  // namespace remat::cpu
