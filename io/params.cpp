#include "io/params.h"

#include <algorithm>
#include <cmath>

#include "base/rng.h"

namespace remat {

std::array<size_t, kNumParamTensors> param_sizes(const ModelConfig& c) {
  const size_t Vp = c.padded_vocab, C = c.channels, L = c.num_layers, T = c.max_seq_len;
  return {Vp * C, T * C, L * C,         L * C,     L * 3 * C * C, L * 3 * C, L * C * C, L * C,
          L * C,  L * C, L * 4 * C * C, L * 4 * C, L * C * 4 * C, L * C,     C,         C};
}

namespace {

std::vector<ParamTensor> llama_table(const ModelConfig& c) {
  std::vector<ParamTensor> t;
  size_t off = 0;
  auto add = [&](const std::string& name, size_t rows, size_t cols, ParamTensor::Init init) {
    ParamTensor p;
    p.name = name;
    p.offset = off;
    p.rows = rows;
    p.cols = cols;
    p.decay = cols > 1;
    p.init = init;
    off += rows * cols;
    t.push_back(p);
  };
  using I = ParamTensor::Init;
  const size_t C = c.channels, Vp = c.padded_vocab, Q = c.qkv_width(), F = c.mlp_width();
  add("embed_tokens.weight", Vp, C, I::kNormal);
  for (int l = 0; l < c.num_layers; l++) {
    const std::string p = "layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", C, 1, I::kOnes);
    add(p + "self_attn.qkv_proj.weight", Q, C, I::kNormal);
    if (c.qkv_bias) add(p + "self_attn.qkv_proj.bias", Q, 1, I::kZeros);
    add(p + "self_attn.o_proj.weight", C, C, I::kNormal);
    add(p + "post_attention_layernorm.weight", C, 1, I::kOnes);
    add(p + "mlp.gate_up_proj.weight", 2 * F, C, I::kNormal);
    add(p + "mlp.down_proj.weight", C, F, I::kNormal);
  }
  add("norm.weight", C, 1, I::kOnes);
  if (!c.tied_embeddings) add("lm_head.weight", Vp, C, I::kNormal);
  return t;
}

}  // namespace

std::vector<ParamTensor> param_table(const ModelConfig& c) {
  if (c.is_llama()) return llama_table(c);
  std::vector<ParamTensor> t;
  const auto sizes = param_sizes(c);
  const auto off = param_offsets(c);
  for (int k = 0; k < kNumParamTensors; k++) {
    ParamTensor p;
    p.name = param_name(k);
    p.offset = off[k];
    p.rows = sizes[k];
    p.decay = param_decays(k);
    t.push_back(p);
  }
  return t;
}

std::string param_element_name(const ModelConfig& c, size_t index) {
  for (const ParamTensor& p : param_table(c))
    if (index >= p.offset && index < p.offset + p.count())
      return p.name + "[" + std::to_string(index - p.offset) + "]";
  return "?";
}

size_t num_params(const ModelConfig& c) {
  if (c.is_llama()) {
    const auto t = llama_table(c);
    return t.back().offset + t.back().count();
  }
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

std::array<size_t, kNumParamTensors> param_offsets(const ModelConfig& c) {
  std::array<size_t, kNumParamTensors> off{};
  auto sizes = param_sizes(c);
  size_t o = 0;
  for (int i = 0; i < kNumParamTensors; i++) {
    off[i] = o;
    o += sizes[i];
  }
  return off;
}

ParamView view_params(float* base, const ModelConfig& c) {
  auto off = param_offsets(c);
  float* p[kNumParamTensors];
  for (int i = 0; i < kNumParamTensors; i++) p[i] = base + off[i];
  return {p[0], p[1], p[2],  p[3],  p[4],  p[5],  p[6],  p[7],
          p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15]};
}

void init_params(float* base, const ModelConfig& c, uint64_t seed) {
  if (c.is_llama()) {
    const auto table = llama_table(c);
    for (size_t k = 0; k < table.size(); k++) {
      const ParamTensor& t = table[k];
      float* p = base + t.offset;
      const size_t n = t.count();
      if (t.init == ParamTensor::Init::kOnes) {
        std::fill(p, p + n, 1.0f);
      } else if (t.init == ParamTensor::Init::kZeros) {
        std::fill(p, p + n, 0.0f);
      } else {
        Philox rng(seed, static_cast<uint64_t>(k));
        for (size_t i = 0; i < n; i++) p[i] = t.init_std * rng.normal();
        if (t.rows == static_cast<size_t>(c.padded_vocab) &&
            (t.name == "embed_tokens.weight" || t.name == "lm_head.weight"))
          std::fill(p + static_cast<size_t>(c.vocab_size) * c.channels, p + n, 0.0f);
      }
    }
    return;
  }
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
