// The checkpoint plan: for every saved tensor of every transformer block, keep it until its
// backward use or recompute it (free after its last forward use, rebuild before its first
// backward use). Model-agnostic: the program names the saved tensors (runtime/program.h);
// the planner chooses.
#pragma once
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "base/bytes.h"
#include "runtime/program.h"

namespace remat {

// What a plan decides about: the saved tensors of every block, by name (Program::slots),
// and the class of op output each is (presets are defined by class).
struct PlanSchema {
  int num_blocks = 0;
  std::vector<std::string> slots;       // e.g. ln1 qkv attn r2 ln2 fch gelu
  std::vector<TensorClass> slot_class;  // one per slot
};
PlanSchema plan_schema(const Program& p);

struct Plan {
  std::string spec;                             // what the user asked for: "selective", ...
  std::vector<std::string> slots;               // the schema's slot names
  std::vector<std::vector<uint8_t>> recompute;  // [block][slot]: 1 = recompute
  // The third choice: kept, but in host memory between its last forward use and its first
  // backward use (copied out on the copy stream, fetched back ahead of the backward pass).
  std::string offload_spec;                   // "" or what --offload asked for: "input+qkv"
  std::vector<std::vector<uint8_t>> offload;  // [block][slot]: 1 = offload (never recomputed)
  std::vector<uint8_t> offload_input;         // [block]: the block's input (its checkpoint)
  bool any_offload() const;
  bool block_offloads(int block) const;
  bool any_recompute() const;
  int num_recomputed() const;  // (block, slot) pairs recomputed
  bool block_recomputes(int block) const;
  // The slots recomputed in a block, joined by '+' ("" for none).
  std::string block_set(int block) const;
};

// What recomputing one slot of one block costs and saves.
struct SlotCost {
  uint64_t bytes = 0;     // bytes freed by not keeping it
  double flops = 0;       // FLOPs to rebuild it alone (everything else kept)
  double seconds = 0;     // modelled time to rebuild it alone
  double lb_seconds = 0;  // a part of `seconds` no other slot's rebuild can share
};

// Parses a policy for a schema's blocks. Presets by the class of op output:
//   none; selective = norm and activation-function outputs (memory-bound ops);
//   attention = selective + attention outputs; full = every saved tensor but the block input;
//   every:K = full on K blocks spread over the model; NAME+NAME+... (e.g. ln1+gelu)
//   optionally followed by per-block overrides ",A-B=POLICY" or ",A=POLICY"
//   (e.g. "selective,0-3=full"). budget:BYTES is handled by plan_for_budget.
// Throws remat::Error naming the bad part.
Plan parse_plan(const std::string& spec, const PlanSchema& schema);

// Adds --offload to a plan: "none", or names joined by '+': "input" (each block's input, its
// checkpoint, from block 1 on: block 0's input is the embedding's output, outside the blocks),
// "kept" (every saved tensor the plan does not recompute) and slot names (e.g. "input+qkv"). A slot
// the plan recomputes cannot also be offloaded. Throws remat::Error naming the bad part.
void apply_offload(Plan& plan, const std::string& spec);

// True when spec starts with "budget:"; *bytes gets the parsed size (accepts K, M, G, KiB,
// MiB, GiB, KB, MB, GB suffixes).
bool parse_budget(const std::string& spec, uint64_t* bytes);

// The least-cost plan whose peak (as measured by `peak_of`, normally a dry run of the real
// schedule) fits in `budget` bytes; `seconds_of` is a plan's exact modelled recompute time.
// Method: any feasible plan gives up at least need = peak_of(none) - budget bytes. The
// least cost under that condition is a knapsack over (block, slot) items, L copies of each
// slot, solved exactly by branch and bound over per-slot counts. Solved with each slot's
// exclusive cost (SlotCost::lb_seconds, additive over any set) its optimum is a lower bound
// on every feasible plan's cost (*lower_bound_seconds); solved with the stand-alone costs it
// gives the counts to try. Those are placed on the lowest blocks (the backward pass reaches
// them last, when the most memory has been freed), checked with peak_of, and `need` is raised
// by the overshoot until the plan fits; then each recomputed item is kept again, most
// expensive first, wherever the plan still fits. With exhaustive_limit >= the number of
// items every plan is tried instead (exact).
// Throws remat::Error naming the smallest feasible budget (peak_of(full)) when even
// recomputing everything does not fit.
Plan plan_for_budget(const std::string& spec, uint64_t budget, const PlanSchema& schema,
                     const std::vector<SlotCost>& costs,
                     const std::function<uint64_t(const Plan&)>& peak_of,
                     const std::function<double(const Plan&)>& seconds_of,
                     double* lower_bound_seconds = nullptr, int exhaustive_limit = 14);

}  // namespace remat
