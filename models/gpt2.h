// GPT-2 written once on the program builder (runtime/program.h): its forward pass, its
// parameters in llm.c's layout, and the entry points the trainer and the commands use. The
// runtime executes the program (runtime/executor.h): forward, recompute, backward, dry run.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>

#include "io/config.h"
#include "runtime/executor.h"
#include "runtime/plan.h"
#include "runtime/program.h"

namespace remat {

// GPT-2's forward at (B, T). Block l's saved tensors: ln1 (LayerNorm 1 and its mean, rstd),
// qkv, attn (attention output and log-sum-exp), r2 (the mid-block residual), ln2, fch (GeLU
// input), gelu; its input x (the residual stream) is a checkpoint. The residual add at a
// block boundary is fused with the next LayerNorm (ln1 of the next block, or the final one).
std::shared_ptr<const Program> gpt2_program(const GPT2Config& c, int B, int T);
// The plan schema (slot names and classes) of GPT-2 with c's blocks.
PlanSchema gpt2_plan_schema(const GPT2Config& c);
// parse_plan for GPT-2 (budget:BYTES is make_plan's).
Plan parse_plan(const std::string& spec, const GPT2Config& c);

// FLOPs of one training step (forward + backward) at (B, T), llm.c's count:
// 6 * params + 6 * L * C * T per token.
double step_flops(const GPT2Config& c, int B, int T);

// The executor over GPT-2's program.
class GPT2Runner : public Executor {
 public:
  GPT2Runner(const GPT2Config& c, int B, int T, Plan plan, ActDType dtype, ScheduleOptions opt,
             bool dry, Backend* backend = nullptr);
  int B() const { return B_; }
  int T() const { return T_; }

 private:
  int B_, T_;
};

// What `remat plan` prints and what each training line's peak comes from.
struct MemoryReport {
  uint64_t params_bytes = 0;  // working weights (bf16 copy on CUDA bf16; fp32 otherwise)
  uint64_t grads_bytes = 0;
  uint64_t optimizer_bytes = 0;  // AdamW m, v (+ fp32 master weights when params are bf16)
  uint64_t activation_peak = 0;  // high-water of activations in the arena
  uint64_t workspace_peak = 0;   // high-water of activation gradients and scratch
  uint64_t arena_peak = 0;       // high-water of both together (the reservation)
  uint64_t total_bytes = 0;      // params + grads + optimizer + arena_peak
  std::array<uint64_t, kNumPhases> activation_peak_in_phase{};
  double recompute_flops = 0;           // per step
  double recompute_flops_fraction = 0;  // recompute_flops / step_flops
  double recompute_seconds = 0;         // per step, by the cost model
};
MemoryReport memory_report(const GPT2Config& c, int B, int T, const Plan& plan, ActDType dt,
                           const ArenaStats& stats, const CostModel& m);

// Activation peak of a plan by the dry run (the planner's peak_of).
uint64_t dry_run_activation_peak(const GPT2Config& c, int B, int T, const Plan& plan, ActDType dt,
                                 const ScheduleOptions& opt);

// Resolves any --recompute policy, budget:BYTES included (budget counts activation bytes).
Plan make_plan(const std::string& spec, const GPT2Config& c, int B, int T, ActDType dt,
               const ScheduleOptions& opt, const CostModel& m,
               double* lower_bound_seconds = nullptr);

}  // namespace remat
