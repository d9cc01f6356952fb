// Fused classifier on the CPU: per chunk of rows, logits by sgemm into the workspace, then a
// softmax cross-entropy per row (row sums in double, columns in order), then the two gradient
// GEMMs. Only the first V columns of wte/logits take part: padded rows of wte are never read.
//
// Each row's logits and dx do not depend on chunk_rows (sgemm sums every element over K in a
// fixed order whatever M is), so the losses, the returned mean and dx are bitwise independent of
// the chunking; dwte is summed over rows chunk by chunk, so it is equal up to rounding.
#include "kernels/classifier.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "kernels/common.h"
#include "kernels/gemm.h"

namespace remat::cpu {

float classifier_forward_backward(float* losses, float* dx, float* dwte, const float* x,
                                  const float* wte, const int* targets, int N, int C, int V, int Vp,
                                  float dloss, float* workspace, int chunk_rows) {
  REMAT_CHECK(N > 0 && C > 0 && V > 0 && Vp >= V,
              "classifier_forward_backward: bad shape N=" + std::to_string(N) + " C=" +
                  std::to_string(C) + " V=" + std::to_string(V) + " Vp=" + std::to_string(Vp));
  REMAT_CHECK(chunk_rows > 0, "classifier_forward_backward: chunk_rows must be positive");
  REMAT_CHECK(losses && x && wte && targets && workspace,
              "classifier_forward_backward: null pointer");
  REMAT_CHECK(dx == nullptr || dwte != nullptr,
              "classifier_forward_backward: dx given without dwte");
  const bool backward = dx != nullptr;
  for (int r0 = 0; r0 < N; r0 += chunk_rows) {
    const int rows = std::min(chunk_rows, N - r0);
    const float* xc = x + static_cast<long>(r0) * C;  // (rows, C)
    float* logits = workspace;                        // (rows, Vp), columns < V used
    sgemm(Trans::kNo, Trans::kYes, rows, V, C, 1.0f, xc, C, wte, C, 0.0f, logits, Vp);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; ++r) {
      float* l = logits + static_cast<long>(r) * Vp;
      const int target = targets[r0 + r];
      float m = l[0];
      for (int j = 1; j < V; ++j) m = std::max(m, l[j]);
      double sum = 0.0;
      for (int j = 0; j < V; ++j) sum += std::exp(l[j] - m);
      const double lse = m + std::log(sum);
      losses[r0 + r] = static_cast<float>(lse - l[target]);
      if (backward) {
        // dlogits_j = (softmax_j - [j == target]) * dloss, in place.
        const float lse_f = static_cast<float>(lse);
        for (int j = 0; j < V; ++j) l[j] = std::exp(l[j] - lse_f) * dloss;
        l[target] -= dloss;
      }
    }
    if (!backward) continue;
    // dx (rows, C) = dlogits (rows, V) @ wte (V, C)
    sgemm(Trans::kNo, Trans::kNo, rows, C, V, 1.0f, logits, Vp, wte, C, 0.0f,
          dx + static_cast<long>(r0) * C, C);
    // dwte (V, C) += dlogits^T (V, rows) @ x (rows, C)
    sgemm(Trans::kYes, Trans::kNo, V, C, rows, 1.0f, logits, Vp, xc, C, 1.0f, dwte, C);
  }
  double total = 0.0;
  for (int i = 0; i < N; ++i) total += losses[i];
  return static_cast<float>(total / N);
}

void classifier_logits(float* logits, const float* x, const float* wte, int N, int C, int V,
                       int Vp) {
  REMAT_CHECK(N >= 0 && C > 0 && V > 0 && Vp >= V, "classifier_logits: bad shape");
  REMAT_CHECK(N == 0 || (logits && x && wte), "classifier_logits: null pointer");
  sgemm(Trans::kNo, Trans::kYes, N, V, C, 1.0f, x, C, wte, C, 0.0f, logits, Vp);
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int i = 0; i < N; ++i) {
    float* row = logits + static_cast<long>(i) * Vp;
    std::fill(row + V, row + Vp, ninf);
  }
}

}  // namespace remat::cpu
