#include "runtime/plan.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>

#include "kernels/common.h"

namespace remat {

PlanSchema plan_schema(const Program& p) {
  return PlanSchema{p.num_blocks, p.slots, p.slot_class};
}

bool Plan::any_offload() const {
  for (size_t l = 0; l < offload_input.size(); l++)
    if (block_offloads(static_cast<int>(l))) return true;
  return false;
}

bool Plan::block_offloads(int block) const {
  if (block < 0 || block >= static_cast<int>(offload_input.size())) return false;
  if (offload_input[block]) return true;
  for (uint8_t x : offload[block])
    if (x) return true;
  return false;
}

void apply_offload(Plan& plan, const std::string& spec) {
  const size_t L = plan.recompute.size(), S = plan.slots.size();
  plan.offload.assign(L, std::vector<uint8_t>(S, 0));
  plan.offload_input.assign(L, 0);
  plan.offload_spec = spec == "none" ? "" : spec;
  if (spec.empty() || spec == "none") return;
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t plus = spec.find('+', start);
    const std::string name =
        spec.substr(start, plus == std::string::npos ? std::string::npos : plus - start);
    if (name == "input") {
      for (size_t l = 1; l < L; l++) plan.offload_input[l] = 1;
    } else if (name == "kept") {  // every saved tensor the plan keeps
      for (size_t l = 0; l < L; l++)
        for (size_t k = 0; k < S; k++) plan.offload[l][k] = !plan.recompute[l][k];
    } else {
      auto it = std::find(plan.slots.begin(), plan.slots.end(), name);
      if (it == plan.slots.end()) {
        std::string known = "input, kept";
        for (const std::string& k : plan.slots) known += ", " + k;
        throw Error("--offload '" + spec + "': unknown tensor '" + name + "' (known: " + known +
                    ")");
      }
      const size_t k = static_cast<size_t>(it - plan.slots.begin());
      for (size_t l = 0; l < L; l++) {
        if (plan.recompute[l][k])
          throw Error("--offload '" + spec + "': '" + name + "' of block " + std::to_string(l) +
                      " is recomputed by --recompute " + plan.spec +
                      "; a tensor is either recomputed or offloaded");
        plan.offload[l][k] = 1;
      }
    }
    if (plus == std::string::npos) break;
    start = plus + 1;
  }
}

bool Plan::any_recompute() const {
  return num_recomputed() > 0;
}

int Plan::num_recomputed() const {
  int n = 0;
  for (const auto& s : recompute)
    for (uint8_t b : s) n += b;
  return n;
}

bool Plan::block_recomputes(int block) const {
  for (uint8_t b : recompute.at(block))
    if (b) return true;
  return false;
}

std::string Plan::block_set(int block) const {
  std::string out;
  for (size_t k = 0; k < slots.size(); k++)
    if (recompute.at(block)[k]) out += (out.empty() ? "" : "+") + slots[k];
  return out;
}

namespace {

using SlotSet = std::vector<uint8_t>;

SlotSet of_classes(const PlanSchema& s, std::initializer_list<TensorClass> classes) {
  SlotSet out(s.slots.size(), 0);
  for (size_t k = 0; k < s.slots.size(); k++)
    for (TensorClass c : classes)
      if (s.slot_class[k] == c) out[k] = 1;
  return out;
}

// The recompute set of a named per-block policy; false when name is not one.
bool named_set(const std::string& name, const PlanSchema& schema, SlotSet* out) {
  using C = TensorClass;
  if (name == "none") {
    *out = SlotSet(schema.slots.size(), 0);
  } else if (name == "selective") {
    *out = of_classes(schema, {C::kNorm, C::kActivation});
  } else if (name == "attention") {
    *out = of_classes(schema, {C::kNorm, C::kActivation, C::kAttention});
  } else if (name == "full") {
    *out = SlotSet(schema.slots.size(), 1);
  } else {
    // NAME+NAME+...
    SlotSet s(schema.slots.size(), 0);
    size_t start = 0;
    while (start <= name.size()) {
      size_t plus = name.find('+', start);
      std::string part =
          name.substr(start, plus == std::string::npos ? std::string::npos : plus - start);
      bool found = false;
      for (size_t k = 0; k < schema.slots.size(); k++) {
        if (part == schema.slots[k]) {
          s[k] = 1;
          found = true;
        }
      }
      if (!found) return false;
      if (plus == std::string::npos) break;
      start = plus + 1;
    }
    *out = s;
  }
  return true;
}

// A block number or count: decimal digits only, at most INT_MAX.
int parse_int(const std::string& text, const std::string& spec) {
  if (text.empty() ||
      !std::all_of(text.begin(), text.end(), [](unsigned char ch) { return std::isdigit(ch); }))
    throw Error("--recompute '" + spec + "': '" + text + "' is not a number");
  int64_t value = 0;
  for (char ch : text) {
    value = value * 10 + (ch - '0');
    if (value > std::numeric_limits<int>::max())
      throw Error("--recompute '" + spec + "': '" + text + "' is too large");
  }
  return static_cast<int>(value);
}

// Applies one policy (a named set or every:K) to blocks [lo, hi].
void apply(Plan& plan, const PlanSchema& schema, const std::string& policy, int lo, int hi,
           const std::string& spec) {
  const int L = static_cast<int>(plan.recompute.size());
  if (policy.rfind("every:", 0) == 0) {
    int k = parse_int(policy.substr(6), spec);
    if (k < 1 || k > L)
      throw Error("--recompute '" + spec + "': every:K needs 1 <= K <= " + std::to_string(L) +
                  " (the model's blocks)");
    // `full` on K blocks spread evenly over [lo, hi].
    const int n = hi - lo + 1;
    for (int b = lo; b <= hi; b++) plan.recompute[b] = SlotSet(schema.slots.size(), 0);
    SlotSet full(schema.slots.size(), 1);
    for (int i = 0; i < std::min(k, n); i++) {
      int b = lo + static_cast<int>((static_cast<int64_t>(i) * n) / k);
      plan.recompute[b] = full;
    }
    return;
  }
  SlotSet s;
  if (!named_set(policy, schema, &s)) {
    std::string names;
    for (const std::string& n : schema.slots) names += (names.empty() ? "" : ", ") + n;
    throw Error("--recompute '" + spec + "': unknown policy '" + policy +
                "' (use none, selective, attention, full, every:K, budget:BYTES, or names "
                "joined by '+' from " +
                names + ")");
  }
  for (int b = lo; b <= hi; b++) plan.recompute[b] = s;
}

}  // namespace

Plan parse_plan(const std::string& spec, const PlanSchema& schema) {
  const int num_blocks = schema.num_blocks;
  REMAT_CHECK(num_blocks > 0, "a plan needs at least one block");
  Plan plan;
  plan.spec = spec;
  plan.slots = schema.slots;
  plan.recompute.assign(num_blocks, SlotSet(schema.slots.size(), 0));
  plan.offload.assign(num_blocks, SlotSet(schema.slots.size(), 0));
  plan.offload_input.assign(num_blocks, 0);
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t comma = spec.find(',', start);
    parts.push_back(
        spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (parts[0].empty()) throw Error("--recompute: empty policy");
  if (parts[0].rfind("budget:", 0) == 0)
    throw Error("--recompute '" + spec + "': budget:BYTES cannot have per-block overrides");
  apply(plan, schema, parts[0], 0, num_blocks - 1, spec);
  for (size_t i = 1; i < parts.size(); i++) {
    const std::string& o = parts[i];
    size_t eq = o.find('=');
    if (eq == std::string::npos)
      throw Error("--recompute '" + spec + "': override '" + o + "' must look like A-B=POLICY");
    std::string range = o.substr(0, eq);
    size_t dash = range.find('-');
    int lo = parse_int(range.substr(0, dash), spec);
    int hi = dash == std::string::npos ? lo : parse_int(range.substr(dash + 1), spec);
    if (!(lo <= hi && hi < num_blocks))
      throw Error("--recompute '" + spec + "': block range " + range + " is outside 0-" +
                  std::to_string(num_blocks - 1));
    apply(plan, schema, o.substr(eq + 1), lo, hi, spec);
  }
  return plan;
}

bool parse_budget(const std::string& spec, uint64_t* bytes) {
  if (spec.rfind("budget:", 0) != 0) return false;
  *bytes = parse_bytes(spec.substr(7));
  return true;
}

namespace {

// Exact minimum of sum c_k * cost_k subject to sum c_k * bytes_k >= need, 0 <= c_k <= L,
// by depth-first branch and bound over kinds sorted by cost per byte, bounded by the
// fractional (LP) relaxation of the remaining kinds.
struct Knapsack {
  std::vector<int> order;  // slots by increasing cost per byte
  std::vector<uint64_t> bytes;
  std::vector<double> cost;
  int L;
  double best = std::numeric_limits<double>::infinity();
  std::vector<int> best_counts, counts;

  Knapsack(const std::vector<SlotCost>& c, int blocks, bool exclusive) : L(blocks) {
    for (const SlotCost& x : c) {
      bytes.push_back(x.bytes);
      cost.push_back(exclusive ? x.lb_seconds : x.seconds);
    }
    for (size_t k = 0; k < c.size(); k++)
      if (bytes[k] > 0) order.push_back(static_cast<int>(k));
    std::sort(order.begin(), order.end(),
              [&](int a, int b) { return cost[a] / bytes[a] < cost[b] / bytes[b]; });
    counts.assign(c.size(), 0);
    best_counts = counts;
  }
  double solve(double need) {
    best = std::numeric_limits<double>::infinity();
    std::fill(counts.begin(), counts.end(), 0);
    search(0, need, 0.0);
    return best;
  }

  // Least cost to cover `need` bytes with kinds order[i..] fractionally.
  double lp_bound(size_t i, double need) const {
    double cost = 0;
    for (; i < order.size() && need > 0; i++) {
      const int k = order[i];
      double take = std::min(static_cast<double>(L), need / bytes[k]);
      cost += take * this->cost[k];
      need -= take * bytes[k];
    }
    return need > 0 ? std::numeric_limits<double>::infinity() : cost;
  }
  void search(size_t i, double need, double cost) {
    if (need <= 0) {
      if (cost < best) {
        best = cost;
        best_counts = counts;
      }
      return;
    }
    if (i == order.size()) return;
    if (cost + lp_bound(i, need) >= best) return;
    const int k = order[i];
    const int useful = static_cast<int>(std::min<double>(L, std::ceil(need / bytes[k])));
    for (int n = useful; n >= 0; n--) {
      counts[k] = n;
      search(i + 1, need - static_cast<double>(n) * bytes[k], cost + n * this->cost[k]);
    }
    counts[order[i]] = 0;
  }
};

}  // namespace

Plan plan_for_budget(const std::string& spec, uint64_t budget, const PlanSchema& schema,
                     const std::vector<SlotCost>& costs,
                     const std::function<uint64_t(const Plan&)>& peak_of,
                     const std::function<double(const Plan&)>& seconds_of,
                     double* lower_bound_seconds, int exhaustive_limit) {
  const int L = schema.num_blocks;
  const int K = static_cast<int>(schema.slots.size());
  REMAT_CHECK(static_cast<int>(costs.size()) == K, "planner: one cost per slot");
  Plan none = parse_plan("none", schema);
  Plan full = parse_plan("full", schema);
  none.spec = full.spec = spec;
  const uint64_t full_peak = peak_of(full);
  if (full_peak > budget) {
    throw Error("--recompute " + spec + ": infeasible: even recomputing everything needs " +
                format_bytes(full_peak) + " (" + std::to_string(full_peak) +
                " bytes) of activation memory; the smallest feasible budget is budget:" +
                std::to_string(full_peak));
  }
  const uint64_t none_peak = peak_of(none);
  if (lower_bound_seconds) *lower_bound_seconds = 0;
  if (none_peak <= budget) return none;

  const int items = L * K;
  if (items <= exhaustive_limit) {
    Plan best = full, trial = none;
    double best_cost = seconds_of(full);
    for (uint64_t mask = 0; mask < (1ull << items); mask++) {
      for (int i = 0; i < items; i++) trial.recompute[i / K][i % K] = (mask >> i) & 1;
      double cost = seconds_of(trial);
      if (cost < best_cost && peak_of(trial) <= budget) {
        best_cost = cost;
        best = trial;
      }
    }
    if (lower_bound_seconds) *lower_bound_seconds = best_cost;
    return best;
  }

  double need = static_cast<double>(none_peak - budget);
  if (lower_bound_seconds) {
    Knapsack bound(costs, L, /*exclusive=*/true);
    const double lb = bound.solve(need);
    *lower_bound_seconds = std::isfinite(lb) ? lb : 0;
  }
  Knapsack ks(costs, L, /*exclusive=*/false);
  Plan plan = full;
  for (int iter = 0; iter < 64; iter++) {
    if (!std::isfinite(ks.solve(need))) break;  // nothing short of everything: full (fits) it is
    Plan trial = none;
    for (int k = 0; k < K; k++)
      for (int b = 0; b < ks.best_counts[k]; b++) trial.recompute[b][k] = 1;
    const uint64_t peak = peak_of(trial);
    if (peak <= budget) {
      plan = trial;
      break;
    }
    need += static_cast<double>(peak - budget);
  }
  // Keep again whatever still fits, most expensive first.
  std::vector<std::pair<int, int>> chosen;
  for (int b = 0; b < L; b++)
    for (int k = 0; k < K; k++)
      if (plan.recompute[b][k]) chosen.push_back({b, k});
  std::stable_sort(chosen.begin(), chosen.end(), [&](auto x, auto y) {
    return costs[x.second].seconds > costs[y.second].seconds;
  });
  // Keeping one more tensor adds at most its bytes to the live bytes at any point (what is
  // live under the new plan is what was live before, or that tensor), so while the bound
  // fits no dry run is needed; the decisions are the ones a dry run per item would make.
  uint64_t peak_bound = peak_of(plan);
  for (auto [b, k] : chosen) {
    plan.recompute[b][k] = 0;
    if (peak_bound + costs[k].bytes <= budget) {
      peak_bound += costs[k].bytes;
      continue;
    }
    const uint64_t peak = peak_of(plan);
    if (peak > budget)
      plan.recompute[b][k] = 1;
    else
      peak_bound = peak;
  }
  return plan;
}

}  // namespace remat
