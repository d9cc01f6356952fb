#include "runtime/plan.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>

#include "kernels/common.h"

namespace remat {

const char* act_kind_name(ActKind k) {
  static const char* names[kNumActKinds] = {"ln1", "qkv", "attn", "r2", "ln2", "fch", "gelu"};
  return names[static_cast<int>(k)];
}

bool Plan::any_recompute() const {
  return num_recomputed() > 0;
}

int Plan::num_recomputed() const {
  int n = 0;
  for (const KindSet& s : recompute)
    for (bool b : s) n += b;
  return n;
}

namespace {

KindSet kinds_of(std::initializer_list<ActKind> ks) {
  KindSet s{};
  for (ActKind k : ks) s[static_cast<int>(k)] = true;
  return s;
}

// The recompute set of a named per-block policy; false when name is not one.
bool named_set(const std::string& name, KindSet* out) {
  using K = ActKind;
  if (name == "none") {
    *out = KindSet{};
  } else if (name == "selective") {
    *out = kinds_of({K::kLN1, K::kLN2, K::kGELU});
  } else if (name == "attention") {
    *out = kinds_of({K::kLN1, K::kLN2, K::kGELU, K::kAttn});
  } else if (name == "full") {
    *out = kinds_of({K::kLN1, K::kQKV, K::kAttn, K::kR2, K::kLN2, K::kFCH, K::kGELU});
  } else {
    // KIND+KIND+...
    KindSet s{};
    size_t start = 0;
    while (start <= name.size()) {
      size_t plus = name.find('+', start);
      std::string part =
          name.substr(start, plus == std::string::npos ? std::string::npos : plus - start);
      bool found = false;
      for (int k = 0; k < kNumActKinds; k++) {
        if (part == act_kind_name(static_cast<ActKind>(k))) {
          s[k] = true;
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
  REMAT_CHECK(!text.empty() && std::all_of(text.begin(), text.end(),
                                           [](unsigned char ch) { return std::isdigit(ch); }),
              "--recompute '" + spec + "': '" + text + "' is not a block number");
  int64_t value = 0;
  for (char ch : text) {
    value = value * 10 + (ch - '0');
    REMAT_CHECK(value <= std::numeric_limits<int>::max(),
                "--recompute '" + spec + "': block number '" + text + "' is too large");
  }
  return static_cast<int>(value);
}

// Applies one policy (a named set or every:K) to blocks [lo, hi].
void apply(Plan& plan, const std::string& policy, int lo, int hi, const std::string& spec) {
  const int L = static_cast<int>(plan.recompute.size());
  if (policy.rfind("every:", 0) == 0) {
    int k = parse_int(policy.substr(6), spec);
    REMAT_CHECK(k >= 0 && k <= L, "--recompute '" + spec + "': every:K needs 0 <= K <= " +
                                      std::to_string(L) + " blocks");
    // `full` on K blocks spread evenly over [lo, hi].
    const int n = hi - lo + 1;
    for (int b = lo; b <= hi; b++) plan.recompute[b] = KindSet{};
    KindSet full;
    named_set("full", &full);
    for (int i = 0; i < std::min(k, n); i++) {
      int b = lo + static_cast<int>((static_cast<int64_t>(i) * n) / std::max(k, 1));
      plan.recompute[b] = full;
    }
    return;
  }
  KindSet s;
  REMAT_CHECK(named_set(policy, &s),
              "--recompute '" + spec + "': unknown policy '" + policy +
                  "' (use none, selective, attention, full, every:K, budget:BYTES, or kinds "
                  "joined by '+' from ln1, qkv, attn, r2, ln2, fch, gelu)");
  for (int b = lo; b <= hi; b++) plan.recompute[b] = s;
}

}  // namespace

Plan parse_plan(const std::string& spec, int num_blocks) {
  REMAT_CHECK(num_blocks > 0, "a plan needs at least one block");
  Plan plan;
  plan.spec = spec;
  plan.recompute.assign(num_blocks, KindSet{});
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t comma = spec.find(',', start);
    parts.push_back(
        spec.substr(start, comma == std::string::npos ? std::string::npos : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  REMAT_CHECK(!parts[0].empty(), "--recompute: empty policy");
  REMAT_CHECK(parts[0].rfind("budget:", 0) != 0,
              "--recompute '" + spec + "': budget plans are made by the planner");
  apply(plan, parts[0], 0, num_blocks - 1, spec);
  for (size_t i = 1; i < parts.size(); i++) {
    const std::string& o = parts[i];
    size_t eq = o.find('=');
    REMAT_CHECK(eq != std::string::npos,
                "--recompute '" + spec + "': override '" + o + "' must look like A-B=POLICY");
    std::string range = o.substr(0, eq);
    size_t dash = range.find('-');
    int lo = parse_int(range.substr(0, dash), spec);
    int hi = dash == std::string::npos ? lo : parse_int(range.substr(dash + 1), spec);
    REMAT_CHECK(lo <= hi && hi < num_blocks, "--recompute '" + spec + "': block range " + range +
                                                 " is outside 0-" + std::to_string(num_blocks - 1));
    apply(plan, o.substr(eq + 1), lo, hi, spec);
  }
  return plan;
}

uint64_t parse_bytes(const std::string& text) {
  size_t pos = 0;
  double value = 0;
  try {
    value = std::stod(text, &pos);
  } catch (const std::exception&) {
    throw Error("'" + text + "' is not a byte count (e.g. 8GiB, 512MB, 1e9)");
  }
  std::string unit = text.substr(pos);
  std::transform(unit.begin(), unit.end(), unit.begin(),
                 [](unsigned char ch) { return static_cast<char>(std::tolower(ch)); });
  double mult = 1;
  if (unit.empty() || unit == "b")
    mult = 1;
  else if (unit == "k" || unit == "kib")
    mult = 1024.0;
  else if (unit == "m" || unit == "mib")
    mult = 1024.0 * 1024;
  else if (unit == "g" || unit == "gib")
    mult = 1024.0 * 1024 * 1024;
  else if (unit == "kb")
    mult = 1e3;
  else if (unit == "mb")
    mult = 1e6;
  else if (unit == "gb")
    mult = 1e9;
  else
    throw Error("'" + text + "': unknown unit '" + unit +
                "' (use K, M, G, KiB, MiB, GiB, KB, MB, GB)");
  REMAT_CHECK(value >= 0 && std::isfinite(value) && value * mult < 1.8e19,
              "'" + text + "' is not a valid byte count");
  return static_cast<uint64_t>(value * mult);
}

bool parse_budget(const std::string& spec, uint64_t* bytes) {
  if (spec.rfind("budget:", 0) != 0) return false;
  *bytes = parse_bytes(spec.substr(7));
  return true;
}

std::string format_bytes(uint64_t b) {
  char buf[64];
  if (b >= (1ull << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / 1073741824.0);
  else if (b >= (1ull << 20))
    std::snprintf(buf, sizeof buf, "%.2f MiB", b / 1048576.0);
  else if (b >= 1024)
    std::snprintf(buf, sizeof buf, "%.2f KiB", b / 1024.0);
  else
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}

double plan_seconds(const Plan& p, const std::array<KindCost, kNumActKinds>& costs) {
  double s = 0;
  for (const KindSet& set : p.recompute)
    for (int k = 0; k < kNumActKinds; k++)
      if (set[k]) s += costs[k].seconds;
  return s;
}

double plan_flops(const Plan& p, const std::array<KindCost, kNumActKinds>& costs) {
  double f = 0;
  for (const KindSet& set : p.recompute)
    for (int k = 0; k < kNumActKinds; k++)
      if (set[k]) f += costs[k].flops;
  return f;
}

namespace {

// Exact minimum of sum c_k * cost_k subject to sum c_k * bytes_k >= need, 0 <= c_k <= L,
// by depth-first branch and bound over kinds sorted by cost per byte, bounded by the
// fractional (LP) relaxation of the remaining kinds.
struct Knapsack {
  std::vector<int> order;  // kinds by increasing cost per byte
  std::array<KindCost, kNumActKinds> costs;
  int L;
  double best = std::numeric_limits<double>::infinity();
  std::array<int, kNumActKinds> best_counts{};
  std::array<int, kNumActKinds> counts{};

  // Least cost to cover `need` bytes with kinds order[i..] fractionally.
  double lp_bound(size_t i, double need) const {
    double cost = 0;
    for (; i < order.size() && need > 0; i++) {
      const KindCost& c = costs[order[i]];
      double take = std::min(static_cast<double>(L), need / c.bytes);
      cost += take * c.seconds;
      need -= take * c.bytes;
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
    const KindCost& c = costs[order[i]];
    const int useful = static_cast<int>(std::min<double>(L, std::ceil(need / c.bytes)));
    for (int n = useful; n >= 0; n--) {
      counts[order[i]] = n;
      search(i + 1, need - static_cast<double>(n) * c.bytes, cost + n * c.seconds);
    }
    counts[order[i]] = 0;
  }
};

}  // namespace

Plan plan_for_budget(const std::string& spec, uint64_t budget, int L,
                     const std::array<KindCost, kNumActKinds>& costs,
                     const std::function<uint64_t(const Plan&)>& peak_of,
                     double* lower_bound_seconds, int exhaustive_limit) {
  Plan none = parse_plan("none", L);
  Plan full = parse_plan("full", L);
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

  const int items = L * kNumActKinds;
  if (items <= exhaustive_limit) {
    Plan best = full, trial = none;
    double best_cost = plan_seconds(full, costs);
    for (uint64_t mask = 0; mask < (1ull << items); mask++) {
      for (int i = 0; i < items; i++)
        trial.recompute[i / kNumActKinds][i % kNumActKinds] = (mask >> i) & 1;
      double cost = plan_seconds(trial, costs);
      if (cost < best_cost && peak_of(trial) <= budget) {
        best_cost = cost;
        best = trial;
      }
    }
    if (lower_bound_seconds) *lower_bound_seconds = best_cost;
    return best;
  }

  Knapsack ks;
  ks.costs = costs;
  ks.L = L;
  for (int k = 0; k < kNumActKinds; k++)
    if (costs[k].bytes > 0) ks.order.push_back(k);
  std::sort(ks.order.begin(), ks.order.end(), [&](int a, int b) {
    return costs[a].seconds / costs[a].bytes < costs[b].seconds / costs[b].bytes;
  });

  double need = static_cast<double>(none_peak - budget);
  Plan plan = full;
  bool first = true;
  for (int iter = 0; iter < 64; iter++) {
    ks.best = std::numeric_limits<double>::infinity();
    ks.counts = {};
    ks.search(0, need, 0.0);
    if (!std::isfinite(ks.best)) break;  // nothing short of everything: full (fits) it is
    if (first && lower_bound_seconds) *lower_bound_seconds = ks.best;
    first = false;
    Plan trial = none;
    for (int k = 0; k < kNumActKinds; k++)
      for (int b = 0; b < ks.best_counts[k]; b++) trial.recompute[b][k] = true;
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
    for (int k = 0; k < kNumActKinds; k++)
      if (plan.recompute[b][k]) chosen.push_back({b, k});
  std::stable_sort(chosen.begin(), chosen.end(), [&](auto x, auto y) {
    return costs[x.second].seconds > costs[y.second].seconds;
  });
  for (auto [b, k] : chosen) {
    plan.recompute[b][k] = false;
    if (peak_of(plan) > budget) plan.recompute[b][k] = true;
  }
  return plan;
}

}  // namespace remat
