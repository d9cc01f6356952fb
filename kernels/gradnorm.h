// Global gradient norm and clipping.
#pragma once
#include <cstddef>

namespace remat::cpu {

// Sum of squares of g (n) in double; deterministic (fixed blocking, summed in block order).
double sum_squares(const float* g, size_t n);

// The factor clipping multiplies gradients by: min(1, max_norm / (norm + 1e-6)); 1 when
// max_norm <= 0 (clipping off) or norm is not finite.
float clip_scale(double norm, float max_norm);

}  // namespace remat::cpu
