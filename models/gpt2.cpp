#include "models/gpt2.h"

#include "base/error.h"
#include "io/params.h"

namespace remat {

std::shared_ptr<const Program> gpt2_program(const ModelConfig& c, int B, int T) {
  REMAT_REQUIRE(T <= c.max_seq_len, "sequence length " + std::to_string(T) +
                                        " exceeds the model's maximum " +
                                        std::to_string(c.max_seq_len));
  const int L = c.num_layers, C = c.channels;
  const auto size = param_sizes(c);
  const auto off = param_offsets(c);
  ProgramBuilder b(B, T);
  // llm.c's layout: each tensor kind holds all layers contiguously.
  auto whole = [&](int k, const std::string& name) {
    return b.param(name, off[k], size[k], param_decays(k));
  };
  auto layer = [&](int k, int l, const std::string& name) {
    const size_t per = size[k] / L;
    return b.param("h." + std::to_string(l) + "." + name, off[k] + l * per, per, param_decays(k));
  };
  const ParamId wte = whole(0, "wte.weight"), wpe = whole(1, "wpe.weight");
  TensorId x = b.embedding(wte, wpe, C, "x");
  b.checkpoint(x);
  TensorId r2 = -1, fcproj = -1;
  for (int l = 0; l < L; l++) {
    b.begin_block(l);
    const ParamId ln1w = layer(2, l, "ln_1.weight"), ln1b = layer(3, l, "ln_1.bias");
    TensorId ln1;
    if (l == 0) {
      ln1 = b.layernorm(x, ln1w, ln1b, "ln1");
    } else {
      std::tie(x, ln1) = b.residual_layernorm(r2, fcproj, ln1w, ln1b, "x", "ln1", "residual_ln1");
      b.checkpoint(x);
    }
    TensorId qkv = b.matmul(ln1, layer(4, l, "attn.c_attn.weight"), layer(5, l, "attn.c_attn.bias"),
                            3 * C, "qkv");
    TensorId attn = b.attention(qkv, c.num_heads, c.num_heads, "attn");
    TensorId proj = b.matmul(attn, layer(6, l, "attn.c_proj.weight"),
                             layer(7, l, "attn.c_proj.bias"), C, "attproj");
    TensorId ln2;
    std::tie(r2, ln2) = b.residual_layernorm(x, proj, layer(8, l, "ln_2.weight"),
                                             layer(9, l, "ln_2.bias"), "r2", "ln2", "residual_ln2");
    TensorId fch =
        b.matmul(ln2, layer(10, l, "mlp.c_fc.weight"), layer(11, l, "mlp.c_fc.bias"), 4 * C, "fch");
    TensorId gelu = b.gelu(fch, "gelu");
    fcproj = b.matmul(gelu, layer(12, l, "mlp.c_proj.weight"), layer(13, l, "mlp.c_proj.bias"), C,
                      "fcproj");
  }
  b.end_blocks();
  TensorId xf, lnf;
  std::tie(xf, lnf) = b.residual_layernorm(r2, fcproj, whole(14, "ln_f.weight"),
                                           whole(15, "ln_f.bias"), "x", "lnf", "residual_lnf");
  (void)xf;
  b.classifier(lnf, wte, c.vocab_size, c.padded_vocab, "classifier");
  b.set_num_params(num_params(c));
  return std::make_shared<const Program>(b.finish());
}

}  // namespace remat
