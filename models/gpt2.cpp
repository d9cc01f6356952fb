#include "models/gpt2.h"

#include "base/error.h"
#include "io/params.h"

namespace remat {

std::shared_ptr<const Program> gpt2_program(const GPT2Config& c, int B, int T) {
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
    TensorId attn = b.attention(qkv, c.num_heads, "attn");
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

PlanSchema gpt2_plan_schema(const GPT2Config& c) {
  return plan_schema(*gpt2_program(c, 1, 1));
}

Plan parse_plan(const std::string& spec, const GPT2Config& c) {
  return parse_plan(spec, gpt2_plan_schema(c));
}

double step_flops(const GPT2Config& c, int B, int T) {
  const double tokens = double(B) * T;
  return tokens * (6.0 * num_params(c) + 6.0 * c.num_layers * c.channels * T);
}

GPT2Runner::GPT2Runner(const GPT2Config& c, int B, int T, Plan plan, ActDType dtype,
                       ScheduleOptions opt, bool dry, Backend* backend)
    : Executor(gpt2_program(c, B, T), std::move(plan), dtype, opt, dry, backend), B_(B), T_(T) {}

MemoryReport memory_report(const GPT2Config& c, int B, int T, const Plan& plan, ActDType dt,
                           const ArenaStats& st, const CostModel& m) {
  MemoryReport r;
  const uint64_t P = num_params(c);
  if (dt == ActDType::kBF16) {
    r.params_bytes = 2 * P;      // bf16 working weights
    r.grads_bytes = 2 * P;       // bf16 gradients
    r.optimizer_bytes = 12 * P;  // fp32 master weights, m and v
  } else {
    r.params_bytes = 4 * P;
    r.grads_bytes = 4 * P;
    r.optimizer_bytes = 8 * P;
  }
  r.activation_peak = st.peak_by_usage[static_cast<int>(Usage::kActivation)];
  r.workspace_peak = st.peak_by_usage[static_cast<int>(Usage::kWorkspace)];
  r.arena_peak = st.peak_bytes;
  r.total_bytes = r.params_bytes + r.grads_bytes + r.optimizer_bytes + r.arena_peak;
  r.activation_peak_in_phase = st.activation_peak_in_phase;
  const RecomputeCost rc = recompute_cost(*gpt2_program(c, B, T), plan, act_bytes(dt), m);
  r.recompute_flops = rc.flops;
  r.recompute_flops_fraction = rc.flops / step_flops(c, B, T);
  r.recompute_seconds = rc.seconds;
  return r;
}

uint64_t dry_run_activation_peak(const GPT2Config& c, int B, int T, const Plan& plan, ActDType dt,
                                 const ScheduleOptions& opt) {
  return dry_run_activation_peak(gpt2_program(c, B, T), plan, dt, opt);
}

Plan make_plan(const std::string& spec, const GPT2Config& c, int B, int T, ActDType dt,
               const ScheduleOptions& opt, const CostModel& m, double* lower_bound_seconds) {
  return make_plan(spec, gpt2_program(c, B, T), dt, opt, m, lower_bound_seconds);
}

}  // namespace remat
