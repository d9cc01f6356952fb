// A model of any family as the runtime sees it: its program at (B, T), its plan schema, and
// the entry points the trainer and the commands use. Each family writes its forward once on
// the program builder (models/gpt2.h, models/llama.h); everything here is family-blind.
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

// The family's program at (B, T).
std::shared_ptr<const Program> model_program(const ModelConfig& c, int B, int T);

// The plan schema (slot names and classes) of the model with c's blocks.
PlanSchema model_plan_schema(const ModelConfig& c);
// parse_plan for the model (budget:BYTES is make_plan's).
Plan parse_plan(const std::string& spec, const ModelConfig& c);

// FLOPs of one training step (forward + backward) at (B, T), llm.c's count:
// 6 * params + 6 * L * C * T per token (GPT-2 counts its position embedding among the params).
double step_flops(const ModelConfig& c, int B, int T);

// The executor over the model's program.
class ModelRunner : public Executor {
 public:
  ModelRunner(const ModelConfig& c, int B, int T, Plan plan, ActDType dtype, ScheduleOptions opt,
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
  uint64_t optimizer_bytes = 0;       // AdamW m, v (+ fp32 master weights when params are bf16)
  bool optimizer_on_host = false;     // --offload-optimizer: optimizer_bytes are host memory
  uint64_t optimizer_link_bytes = 0;  // per step: the update reads and writes them across the link
  double optimizer_link_seconds = 0;
  uint64_t activation_peak = 0;       // high-water of activations in the arena
  uint64_t workspace_peak = 0;        // high-water of activation gradients and scratch
  uint64_t arena_peak = 0;            // high-water of both together (the reservation)
  uint64_t total_bytes = 0;           // params + grads + optimizer + arena_peak: the device's
  uint64_t device_total_bytes = 0;    // the same (named for the JSON beside host_total_bytes)
  uint64_t host_activation_peak = 0;  // high-water of offloaded activations (host arena)
  uint64_t host_total_bytes = 0;      // what the run keeps in (pinned) host memory
  uint64_t copy_bytes = 0;            // offload traffic per step, both directions
  double copy_seconds = 0;            // per step at the link's modelled bandwidth
  std::array<uint64_t, kNumPhases> activation_peak_in_phase{};
  double recompute_flops = 0;           // per step
  double recompute_flops_fraction = 0;  // recompute_flops / step_flops
  double recompute_seconds = 0;         // per step, by the cost model
};
MemoryReport memory_report(const ModelConfig& c, int B, int T, const Plan& plan, ActDType dt,
                           const ArenaStats& stats, const CostModel& m,
                           const ArenaStats* host_stats = nullptr, bool optimizer_on_host = false);

// Activation peak of a plan by the dry run (the planner's peak_of).
uint64_t dry_run_activation_peak(const ModelConfig& c, int B, int T, const Plan& plan, ActDType dt,
                                 const ScheduleOptions& opt);

// Resolves any --recompute policy, budget:BYTES included (budget counts activation bytes).
Plan make_plan(const std::string& spec, const ModelConfig& c, int B, int T, ActDType dt,
               const ScheduleOptions& opt, const CostModel& m,
               double* lower_bound_seconds = nullptr);

}  // namespace remat
