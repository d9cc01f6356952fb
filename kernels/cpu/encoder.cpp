// Token + position embedding on the CPU.
#include "kernels/encoder.h"

#include <algorithm>
#include <string>

#include "kernels/common.h"

namespace remat::cpu {
namespace {

// Channels per thread in the backward: each thread owns a slice of every row of dwte/dwpe.
constexpr int kChannelBlock = 32;

}  // namespace

void encoder_forward(float* out, const int* tokens, const float* wte, const float* wpe, int B,
                     int T, int C) {
  REMAT_CHECK(B >= 0 && T >= 0 && C > 0, "encoder_forward: bad shape");
  REMAT_CHECK(B * T == 0 || (out && tokens && wte), "encoder_forward: null pointer");
#pragma omp parallel for schedule(static)
  for (int bt = 0; bt < B * T; ++bt) {
    const int t = bt % T;
    const float* te = wte + static_cast<long>(tokens[bt]) * C;
    float* o = out + static_cast<long>(bt) * C;
    if (wpe) {
      const float* pe = wpe + static_cast<long>(t) * C;
      for (int c = 0; c < C; ++c) o[c] = te[c] + pe[c];
    } else {
      for (int c = 0; c < C; ++c) o[c] = te[c];
    }
  }
}

void encoder_backward(float* dwte, float* dwpe, const float* dout, const int* tokens, int B, int T,
                      int C) {
  REMAT_CHECK(B >= 0 && T >= 0 && C > 0, "encoder_backward: bad shape");
  REMAT_CHECK(B * T == 0 || (dwte && dout && tokens), "encoder_backward: null pointer");
  // Parallel over channel slices only; within a slice rows are visited in (b, t) order, so each
  // element of dwte and dwpe receives its terms in a fixed order.
  const int nblocks = (C + kChannelBlock - 1) / kChannelBlock;
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < nblocks; ++blk) {
    const int c0 = blk * kChannelBlock;
    const int width = std::min(kChannelBlock, C - c0);
    for (int b = 0; b < B; ++b) {
      for (int t = 0; t < T; ++t) {
        const long bt = static_cast<long>(b) * T + t;
        const float* d = dout + bt * C + c0;
        float* te = dwte + static_cast<long>(tokens[bt]) * C + c0;
        if (dwpe) {
          float* pe = dwpe + static_cast<long>(t) * C + c0;
          for (int j = 0; j < width; ++j) {
            te[j] += d[j];
            pe[j] += d[j];
          }
        } else {
          for (int j = 0; j < width; ++j) te[j] += d[j];
        }
      }
    }
  }
}

}  // namespace remat::cpu
