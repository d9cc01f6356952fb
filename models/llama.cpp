#include "models/llama.h"

#include <cmath>
#include <unordered_map>

#include "base/error.h"
#include "io/params.h"
#include "kernels/rope.h"

namespace remat {

std::vector<float> llama_inv_freq(const ModelConfig& c) {
  const int HD = c.head_dim();
  std::vector<float> f(HD / 2);
  cpu::rope_default_inv_freq(f.data(), HD, c.rope_theta);
  if (c.rope_scaling == "linear") {
    for (float& x : f) x = x / c.rope_factor;
  } else if (c.rope_scaling == "llama3") {
    const float old_len = static_cast<float>(c.rope_original_max_pos);
    const float low_wavelen = old_len / c.rope_low_freq_factor;
    const float high_wavelen = old_len / c.rope_high_freq_factor;
    const float two_pi = static_cast<float>(2.0 * M_PI);
    for (float& x : f) {
      const float wavelen = two_pi / x;
      const float scaled = wavelen > low_wavelen ? x / c.rope_factor : x;
      if (wavelen < high_wavelen || wavelen > low_wavelen) {
        x = scaled;
      } else {
        const float smooth = (old_len / wavelen - c.rope_low_freq_factor) /
                             (c.rope_high_freq_factor - c.rope_low_freq_factor);
        x = (1.0f - smooth) * scaled / c.rope_factor + smooth * scaled;
      }
    }
  } else {
    REMAT_REQUIRE(c.rope_scaling.empty(), "rope scaling '" + c.rope_scaling + "' is not supported");
  }
  return f;
}

std::shared_ptr<const Program> llama_program(const ModelConfig& c, int B, int T) {
  REMAT_REQUIRE(T <= c.max_seq_len, "sequence length " + std::to_string(T) +
                                        " exceeds the model's maximum " +
                                        std::to_string(c.max_seq_len));
  const int L = c.num_layers, C = c.channels, NH = c.num_heads, NKV = c.kv_heads();
  const int Q = c.qkv_width(), F = c.mlp_width();
  const float eps = c.norm_eps;
  const std::vector<float> inv_freq = llama_inv_freq(c);
  ProgramBuilder b(B, T);
  std::unordered_map<std::string, ParamId> id;
  for (const ParamTensor& t : param_table(c))
    id[t.name] = b.param(t.name, t.offset, t.count(), t.decay);
  auto param = [&](const std::string& name) {
    auto it = id.find(name);
    REMAT_CHECK(it != id.end(), "llama: no parameter " + name);
    return it->second;
  };
  auto layer = [&](int l, const std::string& name) {
    return param("layers." + std::to_string(l) + "." + name);
  };
  const ParamId wte = param("embed_tokens.weight");
  TensorId x = b.embedding(wte, -1, C, "x");
  b.checkpoint(x);
  TensorId r2 = -1, down = -1;
  for (int l = 0; l < L; l++) {
    b.begin_block(l);
    const ParamId ln1w = layer(l, "input_layernorm.weight");
    TensorId ln1;
    if (l == 0) {
      ln1 = b.rmsnorm(x, ln1w, eps, "ln1");
    } else {
      std::tie(x, ln1) = b.residual_rmsnorm(r2, down, ln1w, eps, "x", "ln1", "residual_ln1");
      b.checkpoint(x);
    }
    const ParamId qkv_b = c.qkv_bias ? layer(l, "self_attn.qkv_proj.bias") : -1;
    TensorId qkv = b.matmul(ln1, layer(l, "self_attn.qkv_proj.weight"), qkv_b, Q, "qkv");
    TensorId qkvr = b.rope(qkv, NH, NKV, inv_freq, "qkvr");
    TensorId attn = b.attention(qkvr, NH, NKV, "attn");
    TensorId proj = b.matmul(attn, layer(l, "self_attn.o_proj.weight"), -1, C, "attproj");
    TensorId ln2;
    std::tie(r2, ln2) = b.residual_rmsnorm(x, proj, layer(l, "post_attention_layernorm.weight"),
                                           eps, "r2", "ln2", "residual_ln2");
    TensorId gate_up = b.matmul(ln2, layer(l, "mlp.gate_up_proj.weight"), -1, 2 * F, "gate_up");
    TensorId act = b.swiglu(gate_up, "swiglu");
    down = b.matmul(act, layer(l, "mlp.down_proj.weight"), -1, C, "down");
  }
  b.end_blocks();
  TensorId xf, lnf;
  std::tie(xf, lnf) =
      b.residual_rmsnorm(r2, down, param("norm.weight"), eps, "x", "lnf", "residual_lnf");
  (void)xf;
  const ParamId head = c.tied_embeddings ? wte : param("lm_head.weight");
  b.classifier(lnf, head, c.vocab_size, c.padded_vocab, "classifier");
  b.set_num_params(num_params(c));
  return std::make_shared<const Program>(b.finish());
}

}  // namespace remat
