// The checkpoint plan: for every activation kind of every transformer block, keep it until
// its backward use or recompute it (free after its last forward use, rebuild before its
// first backward use). Model-agnostic: the model describes its kinds (bytes and recompute
// cost); the planner chooses.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace remat {

// The activations a GPT-2 block stores, each the output group of one forward op.
enum class ActKind : int {
  kLN1 = 0,  // ln1 (N, C) + mean, rstd (N): LayerNorm of the block input
  kQKV,      // qkv (N, 3C): ln1 @ Wqkv + b
  kAttn,     // atty (N, C) + lse (B, NH, T): flash attention output and log-sum-exp
  kR2,       // r2 (N, C): block input + attention projection (the mid-block residual)
  kLN2,      // ln2 (N, C) + mean, rstd (N)
  kFCH,      // fch (N, 4C): ln2 @ Wfc + b (GeLU input)
  kGELU,     // gelu (N, 4C)
  kCount
};
constexpr int kNumActKinds = static_cast<int>(ActKind::kCount);
const char* act_kind_name(ActKind k);

using KindSet = std::array<bool, kNumActKinds>;  // true = recompute

struct Plan {
  std::string spec;                // what the user asked for, e.g. "selective" or "budget:8GiB"
  std::vector<KindSet> recompute;  // one per block
  bool any_recompute() const;
  int num_recomputed() const;  // (block, kind) pairs recomputed
};

// What recomputing one kind of one block costs and saves.
struct KindCost {
  uint64_t bytes;  // bytes freed by not keeping it
  double flops;    // FLOPs to rebuild it
  double seconds;  // modelled time to rebuild it (roofline of flops and bytes moved)
};

// Parses a policy for `num_blocks` blocks:
//   none | selective | attention | full | every:K | KIND+KIND+... (e.g. ln1+gelu)
//   optionally followed by per-block overrides ",A-B=POLICY" or ",A=POLICY"
//   (e.g. "selective,0-3=full"). budget:BYTES is handled by plan_for_budget.
// Throws remat::Error naming the bad part.
Plan parse_plan(const std::string& spec, int num_blocks);

// True when spec starts with "budget:"; *bytes gets the parsed size (accepts K, M, G, KiB,
// MiB, GiB, KB, MB, GB suffixes).
bool parse_budget(const std::string& spec, uint64_t* bytes);
uint64_t parse_bytes(const std::string& text);
std::string format_bytes(uint64_t bytes);

// The least-cost plan whose peak (as measured by `peak_of`, normally a dry run of the real
// schedule) fits in `budget` bytes.
// Method: a necessary condition for any feasible plan is that the bytes it does not keep are
// at least need = peak_of(none) - budget. Minimising cost under that condition is a knapsack
// over (block, kind) items with L identical copies of each kind; it is solved exactly by
// branch and bound over per-kind counts. Its optimum is a lower bound on every feasible
// plan's cost (reported in *lower_bound_seconds). The chosen counts are placed on the
// lowest blocks (the backward pass reaches them last, when the most memory has been freed, so
// their recompute transients cost least), checked with peak_of, and `need` is raised by the
// overshoot until the plan fits; then each recomputed item is kept again, most expensive
// first, wherever the plan still fits. With exhaustive_limit >= number of items, every plan
// is tried instead, which is exact.
// Throws remat::Error naming the smallest feasible budget (peak_of(full plan)) when even
// recomputing everything does not fit.
Plan plan_for_budget(const std::string& spec, uint64_t budget, int num_blocks,
                     const std::array<KindCost, kNumActKinds>& costs,
                     const std::function<uint64_t(const Plan&)>& peak_of,
                     double* lower_bound_seconds = nullptr, int exhaustive_limit = 14);

double plan_seconds(const Plan& p, const std::array<KindCost, kNumActKinds>& costs);
double plan_flops(const Plan& p, const std::array<KindCost, kNumActKinds>& costs);

}  // namespace remat
