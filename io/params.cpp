#include "io/params.h"

#include <cmath>

#include "base/rng.h"

namespace remat {

std::array<size_t, kNumParamTensors> param_sizes(const GPT2Config& c) {
  const size_t Vp = c.padded_vocab, C = c.channels, L = c.num_layers, T = c.max_seq_len;
  return {Vp * C, T * C, L * C,         L * C,     L * 3 * C * C, L * 3 * C, L * C * C, L * C,
          L * C,  L * C, L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C,     C,         C};
}

size_t num_params(const GPT2Config& c) {
  size_t n = 0;
  for (size_t s : param_sizes(c)) n += s;
  return n;
}

bool param_decays(int t) {
  return t == 0 || t == 1 || t == 4 || t == 6 || t == 10 || t == 12;
}

const char* param_name(int t) {
  static const char* names[kNumParamTensors] = {
      "wte",  "wpe",  "ln1w", "ln1b", "qkvw",    "qkvb",    "attprojw", "attprojb",
      "ln2w", "ln2b", "fcw",  "fcb",  "fcprojw", "fcprojb", "lnfw",     "lnfb"};
  return names[t];
}

std::array<size_t, kNumParamTensors> param_offsets(const GPT2Config& c) {
  std::array<size_t, kNumParamTensors> off{};
  auto sizes = param_sizes(c);
  size_t o = 0;
  for (int i = 0; i < kNumParamTensors; i++) {
    off[i] = o;
    o += sizes[i];
  }
  return off;
}

ParamView view_params(float* base, const GPT2Config& c) {
  auto off = param_offsets(c);
  float* p[kNumParamTensors];
  for (int i = 0; i < kNumParamTensors; i++) p[i] = base + off[i];
  return {p[0], p[1], p[2],  p[3],  p[4],  p[5],  p[6],  p[7],
          p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]};
}

void init_params(float* base, const GPT2Config& c, uint64_t seed) {
  auto sizes = param_sizes(c);
  auto off = param_offsets(c);
  const float residual_scale = 1.0f / std::sqrt(2.0f * c.num_layers);
  for (int t = 0; t < kNumParamTensors; t++) {
    float* p = base + off[t];
    const size_t n = sizes[t];
    const bool is_ln_weight = (t == 2 || t == 8 || t == 14);
    const bool is_bias = (t == 3 || t == 5 || t == 7 || t == 9 || t == 11 || t == 13 || t == 15);
    if (is_ln_weight) {
      for (size_t i = 0; i < n; i++) p[i] = 1.0f;
    } else if (is_bias) {
      for (size_t i = 0; i < n; i++) p[i] = 0.0f;
    } else {
      // Each tensor has its own stream of the counter-based generator.
      Philox rng(seed, static_cast<uint64_t>(t));
      const float std = 0.02f * ((t == 6 || t == 12) ? residual_scale : 1.0f);
      for (size_t i = 0; i < n; i++) p[i] = std * rng.normal();
      if (t == 0) {
        for (size_t i = static_cast<size_t>(c.vocab_size) * c.channels; i < n; i++) p[i] = 0.0f;
      }
    }
  }
}

}  // namespace remat
