#include "models/model.h"

#include "base/error.h"
#include "io/params.h"
#include "models/gpt2.h"
#include "models/llama.h"

namespace remat {

std::shared_ptr<const Program> model_program(const ModelConfig& c, int B, int T) {
  return c.is_llama() ? llama_program(c, B, T) : gpt2_program(c, B, T);
}

PlanSchema model_plan_schema(const ModelConfig& c) {
  return plan_schema(*model_program(c, 1, 1));
}

Plan parse_plan(const std::string& spec, const ModelConfig& c) {
  return parse_plan(spec, model_plan_schema(c));
}

double step_flops(const ModelConfig& c, int B, int T) {
  const double tokens = double(B) * T;
  return tokens * (6.0 * num_params(c) + 6.0 * c.num_layers * c.channels * T);
}

ModelRunner::ModelRunner(const ModelConfig& c, int B, int T, Plan plan, ActDType dtype,
                         ScheduleOptions opt, bool dry, Backend* backend)
    : Executor(model_program(c, B, T), std::move(plan), dtype, opt, dry, backend), B_(B), T_(T) {}

MemoryReport memory_report(const ModelConfig& c, int B, int T, const Plan& plan, ActDType dt,
                           const ArenaStats& st, const CostModel& m, const ArenaStats* host,
                           bool optimizer_on_host) {
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
  r.device_total_bytes = r.total_bytes;
  if (host) r.host_activation_peak = host->extent_peak;
  r.host_total_bytes = r.host_activation_peak;
  r.optimizer_on_host = optimizer_on_host;
  if (optimizer_on_host) {
    // Master weights and moments move to the host; fp32 training then keeps a separate
    // device copy of the weights (the kernels' operand).
    r.device_total_bytes -= r.optimizer_bytes;
    r.host_total_bytes += r.optimizer_bytes + (dt == ActDType::kFP32 ? 4 * P : 0);
    if (dt == ActDType::kFP32) r.optimizer_bytes += 4 * P;
    r.optimizer_link_bytes = 2 * r.optimizer_bytes;
    r.optimizer_link_seconds = double(r.optimizer_link_bytes) / m.link_bytes_per_s;
  }
  r.activation_peak_in_phase = st.activation_peak_in_phase;
  const RecomputeCost rc = recompute_cost(*model_program(c, B, T), plan, act_bytes(dt), m);
  r.recompute_flops = rc.flops;
  r.recompute_flops_fraction = rc.flops / step_flops(c, B, T);
  r.recompute_seconds = rc.seconds;
  const CopyCost cc = copy_cost(*model_program(c, B, T), plan, act_bytes(dt), m);
  r.copy_bytes = cc.bytes;
  r.copy_seconds = cc.seconds;
  return r;
}

uint64_t dry_run_activation_peak(const ModelConfig& c, int B, int T, const Plan& plan, ActDType dt,
                                 const ScheduleOptions& opt) {
  return dry_run_activation_peak(model_program(c, B, T), plan, dt, opt);
}

Plan make_plan(const std::string& spec, const ModelConfig& c, int B, int T, ActDType dt,
               const ScheduleOptions& opt, const CostModel& m, double* lower_bound_seconds) {
  return make_plan(spec, model_program(c, B, T), dt, opt, m, lower_bound_seconds);
}

}  // namespace remat
