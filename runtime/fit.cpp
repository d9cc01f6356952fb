#include "runtime/fit.h"

#include <algorithm>

#include "base/bytes.h"
#include "base/error.h"

namespace remat {

uint64_t state_device_bytes(uint64_t n, ActDType dt, bool offload_optimizer) {
  // bf16: weights and gradients 2 + 2, master weights and moments 12; fp32: 4 + 4 and 8
  // (the weights are the master), or with the optimizer offloaded a device working copy.
  if (dt == ActDType::kBF16) return (offload_optimizer ? 4 : 16) * n;
  return (offload_optimizer ? 8 : 16) * n;
}

uint64_t state_host_bytes(uint64_t n, ActDType dt, bool offload_optimizer) {
  if (!offload_optimizer) return 0;
  return 12 * n;  // fp32 master weights, m and v
  (void)dt;
}

std::string FitChoice::describe() const {
  std::string s = "--recompute " + plan.spec;
  s += " --offload " + (plan.offload_spec.empty() ? std::string("none") : plan.offload_spec);
  if (offload_optimizer) s += " --offload-optimizer";
  return s;
}

FitChoice evaluate_choice(const Plan& plan, bool offload_optimizer,
                          std::shared_ptr<const Program> p, ActDType dt, const ScheduleOptions& opt,
                          const CostModel& m) {
  FitChoice f;
  f.plan = plan;
  f.offload_optimizer = offload_optimizer;
  Executor dry(p, plan, dt, opt, /*dry=*/true);
  dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
  const int es = act_bytes(dt);
  const uint64_t n = p->num_params;
  f.device_bytes = state_device_bytes(n, dt, offload_optimizer) + dry.stats().peak_bytes;
  f.host_bytes = state_host_bytes(n, dt, offload_optimizer) + dry.host_stats().peak_bytes;
  // Compute: every op's forward once and its backward as twice the forward (the usual 1:2).
  double fwd = 0;
  for (const OpDesc& op : p->ops) fwd += op_seconds(op, es, m);
  f.compute_seconds = 3 * fwd;
  f.recompute_seconds = recompute_cost(*p, plan, es, m).seconds;
  // Half the traffic goes out under the forward pass, half comes back under the backward.
  const double half = copy_cost(*p, plan, es, m).seconds / 2;
  f.exposed_copy_seconds = std::max(0.0, half - fwd) + std::max(0.0, half - 2 * fwd);
  if (offload_optimizer)
    f.optimizer_link_seconds =
        2.0 * double(state_host_bytes(n, dt, true)) / m.link_bytes_per_s;  // read and write
  return f;
}

FitChoice fit_plan(uint64_t budget, std::shared_ptr<const Program> p, ActDType dt,
                   const ScheduleOptions& opt, const CostModel& m) {
  const PlanSchema schema = plan_schema(*p);
  const int es = act_bytes(dt);
  const std::vector<SlotCost> costs = slot_costs(*p, es, m);
  const uint64_t n = p->num_params;
  bool found = false;
  FitChoice best;
  uint64_t smallest = UINT64_MAX;
  for (bool opt_off : {false, true}) {
    // Offload: nothing, the block inputs, or the block inputs and every tensor the plan keeps
    // (recompute then only pays where copies would be exposed).
    for (const char* offload : {"none", "input", "input+kept"}) {
      const uint64_t state = state_device_bytes(n, dt, opt_off);
      auto with_offload = [&](Plan q) {
        apply_offload(q, offload);
        return q;
      };
      // The arena's whole peak (activations and workspace) must fit beside the state.
      auto arena_peak = [&](const Plan& q) {
        Executor dry(p, with_offload(q), dt, opt, /*dry=*/true);
        dry.forward_backward(nullptr, nullptr, nullptr, nullptr, 1.0f);
        return dry.stats().peak_bytes;
      };
      Plan full = parse_plan("full", schema);
      smallest = std::min(smallest, state + arena_peak(full));
      if (state >= budget || state + arena_peak(full) > budget) continue;
      const std::string spec = "budget:" + std::to_string(budget - state);
      Plan q = plan_for_budget(spec, budget - state, schema, costs, arena_peak,
                               [&](const Plan& x) { return recompute_cost(*p, x, es, m).seconds; });
      if (!q.any_recompute()) q.spec = "none";
      const FitChoice f = evaluate_choice(with_offload(q), opt_off, p, dt, opt, m);
      REMAT_CHECK(f.device_bytes <= budget, "fit: the chosen plan does not fit its budget");
      if (!found || f.seconds() < best.seconds()) {
        best = f;
        found = true;
      }
    }
  }
  if (!found)
    throw Error("--fit " + format_bytes(budget) + ": infeasible: the smallest device footprint " +
                "(--recompute full --offload input --offload-optimizer) is " +
                format_bytes(smallest) + " (" + std::to_string(smallest) + " bytes); --fit " +
                std::to_string(smallest) + " is the smallest feasible");
  return best;
}

}  // namespace remat
