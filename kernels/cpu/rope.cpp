// Rotary position embedding on the CPU (Hugging Face rotate-half). The (T, HD/2) cos/sin
// table is built once per call from fp32 inverse frequencies and fp32 angles, as Hugging
// Face computes them; cos and sin of each float angle are evaluated in double and rounded
// once. Rows are independent, so any split over them is deterministic.
#include "kernels/rope.h"

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/common.h"

namespace remat::cpu {
namespace {

enum class Direction { kForward, kTranspose };

void check_shape(const char* who, int B, int T, int NH, int NKV, int HD, const float* inv_freq) {
  REMAT_CHECK(B >= 0 && T >= 0 && NH > 0 && NKV > 0 && HD > 0 && HD % 2 == 0 && inv_freq,
              std::string(who) + ": bad shape B=" + std::to_string(B) + " T=" + std::to_string(T) +
                  " NH=" + std::to_string(NH) + " NKV=" + std::to_string(NKV) +
                  " HD=" + std::to_string(HD) + (inv_freq ? "" : ", no frequencies"));
}

void check_theta(const char* who, float theta) {
  REMAT_CHECK(theta > 0.0f,
              std::string(who) + ": theta must be positive, got " + std::to_string(theta));
}

// cos_t, sin_t (T, HD/2): position t, frequency i.
void build_table(std::vector<float>& cos_t, std::vector<float>& sin_t, int T, int HD,
                 const float* inv_freq) {
  const int half = HD / 2;
  cos_t.resize(static_cast<size_t>(T) * half);
  sin_t.resize(cos_t.size());
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < half; ++i) {
      const float angle = static_cast<float>(t) * inv_freq[i];
      cos_t[static_cast<size_t>(t) * half + i] = static_cast<float>(std::cos(double{angle}));
      sin_t[static_cast<size_t>(t) * half + i] = static_cast<float>(std::sin(double{angle}));
    }
}

// dst = R(angle) src (kForward) or R(angle)^T src (kTranspose) for the NH + NKV q and k heads
// of every row; the NKV v heads copied.
void rotate(float* dst, const float* src, int B, int T, int NH, int NKV, int HD,
            const float* inv_freq, Direction dir) {
  std::vector<float> cos_t, sin_t;
  build_table(cos_t, sin_t, T, HD, inv_freq);
  const int half = HD / 2;
  const int rotated = NH + NKV;                          // q and k heads
  const long ld = static_cast<long>(NH + 2 * NKV) * HD;  // packed row width
  const float sign = dir == Direction::kForward ? 1.0f : -1.0f;
  const long rows = static_cast<long>(B) * T;
#pragma omp parallel for schedule(static)
  for (long row = 0; row < rows; ++row) {
    const int t = static_cast<int>(row % T);
    const float* cs = cos_t.data() + static_cast<size_t>(t) * half;
    const float* sn = sin_t.data() + static_cast<size_t>(t) * half;
    const float* x = src + row * ld;
    float* y = dst + row * ld;
    for (int h = 0; h < rotated; ++h) {
      const float* xh = x + static_cast<long>(h) * HD;
      float* yh = y + static_cast<long>(h) * HD;
      for (int i = 0; i < half; ++i) {
        const float c = cs[i], s = sign * sn[i];
        const float a = xh[i], b = xh[i + half];
        yh[i] = a * c - b * s;
        yh[i + half] = b * c + a * s;
      }
    }
    std::memcpy(y + static_cast<long>(rotated) * HD, x + static_cast<long>(rotated) * HD,
                sizeof(float) * static_cast<size_t>(NKV) * HD);
  }
}

}  // namespace

void rope_default_inv_freq(float* inv_freq, int HD, float theta) {
  for (int i = 0; i < HD / 2; ++i)
    inv_freq[i] = 1.0f / std::pow(theta, static_cast<float>(2 * i) / static_cast<float>(HD));
}

void rope_forward(float* out, const float* inp, int B, int T, int NH, int NKV, int HD,
                  const float* inv_freq) {
  check_shape("rope_forward", B, T, NH, NKV, HD, inv_freq);
  REMAT_CHECK(B * T == 0 || (out && inp && out != inp), "rope_forward: null or aliased pointer");
  rotate(out, inp, B, T, NH, NKV, HD, inv_freq, Direction::kForward);
}

void rope_backward(float* dinp, const float* dout, int B, int T, int NH, int NKV, int HD,
                   const float* inv_freq) {
  check_shape("rope_backward", B, T, NH, NKV, HD, inv_freq);
  REMAT_CHECK(B * T == 0 || (dinp && dout && dinp != dout),
              "rope_backward: null or aliased pointer");
  rotate(dinp, dout, B, T, NH, NKV, HD, inv_freq, Direction::kTranspose);
}

void rope_forward(float* out, const float* inp, int B, int T, int NH, int NKV, int HD,
                  float theta) {
  check_theta("rope_forward", theta);
  std::vector<float> f(HD > 0 ? HD / 2 : 0);
  rope_default_inv_freq(f.data(), HD, theta);
  rope_forward(out, inp, B, T, NH, NKV, HD, f.data());
}

void rope_backward(float* dinp, const float* dout, int B, int T, int NH, int NKV, int HD,
                   float theta) {
  check_theta("rope_backward", theta);
  std::vector<float> f(HD > 0 ? HD / 2 : 0);
  rope_default_inv_freq(f.data(), HD, theta);
  rope_backward(dinp, dout, B, T, NH, NKV, HD, f.data());
}

}  // namespace remat::cpu
