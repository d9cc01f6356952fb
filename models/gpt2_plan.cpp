// The planner's view of GPT-2: bytes and recompute cost of each activation kind, the step's
// FLOPs, and the memory report printed by `remat plan` and the training log.
#include <algorithm>

#include "kernels/common.h"
#include "models/gpt2.h"
#include "models/params.h"

namespace remat {

std::array<KindCost, kNumActKinds> kind_costs(const GPT2Config& c, int B, int T, ActDType dt,
                                              const CostModel& m) {
  const double N = double(B) * T, C = c.channels, es = act_bytes(dt);
  std::array<KindCost, kNumActKinds> out{};
  // FLOPs and bytes moved by the op(s) that rebuild each kind.
  struct Work {
    double flops, bytes;
  };
  const Work ln{8 * N * C, 2 * N * C * es + 8 * N};
  const Work work[kNumActKinds] = {
      ln,                                                         // ln1: LayerNorm
      {2 * N * C * 3 * C, (N * C + 3 * N * C + 3 * C * C) * es},  // qkv: GEMM
      {2.0 * B * double(T) * T * C, (3 * N * C + N * C) * es},    // attn: causal flash fwd
      {2 * N * C * C + 8 * N * C, (3 * N * C + C * C) * es},      // r2: attproj GEMM + add
      ln,                                                         // ln2: LayerNorm
      {2 * N * C * 4 * C, (N * C + 4 * N * C + 4 * C * C) * es},  // fch: GEMM
      {8 * 4 * N * C, 2 * 4 * N * C * es},                        // gelu: elementwise
  };
  for (int k = 0; k < kNumActKinds; k++) {
    out[k].bytes = kind_bytes(c, B * T, dt, k);
    out[k].flops = work[k].flops;
    out[k].seconds = std::max(work[k].flops / m.flops_per_s, work[k].bytes / m.bytes_per_s);
  }
  return out;
}

double step_flops(const GPT2Config& c, int B, int T) {
  const double tokens = double(B) * T;
  return tokens * (6.0 * num_params(c) + 6.0 * c.num_layers * c.channels * T);
}

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
  auto costs = kind_costs(c, B, T, dt, m);
  r.recompute_flops = plan_flops(plan, costs);
  r.recompute_flops_fraction = r.recompute_flops / step_flops(c, B, T);
  r.recompute_seconds = plan_seconds(plan, costs);
  return r;
}

uint64_t dry_run_activation_peak(const GPT2Config& c, int B, int T, const Plan& plan, ActDType dt,
                                 const ScheduleOptions& opt) {
  GPT2Runner dry(c, B, T, plan, dt, opt, /*dry=*/true);
  dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
  return dry.stats().peak_by_usage[static_cast<int>(Usage::kActivation)];
}

Plan make_plan(const std::string& spec, const GPT2Config& c, int B, int T, ActDType dt,
               const ScheduleOptions& opt, const CostModel& m) {
  uint64_t budget = 0;
  if (!parse_budget(spec, &budget)) return parse_plan(spec, c.num_layers);
  auto costs = kind_costs(c, B, T, dt, m);
  return plan_for_budget(spec, budget, c.num_layers, costs, [&](const Plan& p) {
    return dry_run_activation_peak(c, B, T, p, dt, opt);
  });
}

}  // namespace remat
