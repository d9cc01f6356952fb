// GPT-2 forward and backward driven through the memory runtime: every activation lives in
// the arena, the checkpoint plan says which ones are kept, and the recompute scheduler
// rebuilds the others on a side stream while the main stream runs the backward pass of the
// block above.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "models/config.h"
#include "runtime/arena.h"
#include "runtime/backend.h"
#include "runtime/plan.h"
#include "runtime/stream.h"

namespace remat {

// Activations (and activation gradients) have the backend's element type (ActDType,
// runtime/backend.h); LayerNorm statistics and the attention log-sum-exp are fp32 on both.

// Sub-buffer layout of one activation kind's arena block: the main tensor first (activation
// dtype), then fp32 extras, each part aligned to Arena::kAlign.
struct KindLayout {
  size_t main_elems;   // elements of the main tensor
  size_t extra_elems;  // fp32 elements after it (LN mean then rstd, or attention lse)
  const char* main_name;
  const char* extra_name;
};
KindLayout kind_layout(const GPT2Config& c, int N, int kind);
// Arena bytes of one block's activation kind at N = B*T rows.
uint64_t kind_bytes(const GPT2Config& c, int N, ActDType dt, int kind);

struct ScheduleOptions {
  int lookahead = 1;              // blocks the side stream rebuilds ahead of the backward pass
  bool verify_recompute = false;  // keep originals, compare every recomputed tensor bit for bit
  int classifier_chunk = 0;       // rows per classifier chunk; 0 = automatic (64 MiB of logits)
  // Test-only: the main stream does not wait for the recompute-ready event (a missing event),
  // and the side stream sleeps this long before each block's recompute (CPU backend; on CUDA
  // the sleep holds the one host thread that enqueues for both streams, so it delays all).
  bool debug_skip_ready_wait = false;
  int debug_recompute_delay_ms = 0;
};

// The recompute cost model of one block's activation kinds at (B, T).
struct CostModel {
  double flops_per_s = 1e11;  // device GEMM throughput the model assumes
  double bytes_per_s = 2e10;  // device memory bandwidth the model assumes
};
std::array<KindCost, kNumActKinds> kind_costs(const GPT2Config& c, int B, int T, ActDType dt,
                                              const CostModel& m);
// FLOPs of one training step (forward + backward) at (B, T), llm.c's count:
// 6 * params * tokens + 6 * L * C * T * tokens... as 6N + 6LCT per token.
double step_flops(const GPT2Config& c, int B, int T);

class GPT2Runner {
 public:
  // dry = true: null streams and an arena with no memory; the same schedule runs, nothing
  // executes, and stats() is the prediction (dtype only sizes the tensors). dry = false: the
  // backend's streams and one reservation of its memory sized by a dry run of the same
  // schedule; dtype must be the backend's. backend nullptr = the CPU backend.
  GPT2Runner(const GPT2Config& c, int B, int T, Plan plan, ActDType dtype, ScheduleOptions opt,
             bool dry, Backend* backend = nullptr);
  ~GPT2Runner();

  // One forward and backward pass. params and grads are num_params elements of the backend's
  // dtype in its memory (llm.c's layout); params are read, grads accumulated (+=). inputs,
  // targets (B*T) host token ids, already checked < V. dloss scales the gradient of the
  // summed loss (1 / (B*T*accumulation steps)). Returns the mean loss.
  float forward_backward(const void* params, void* grads, const int* inputs, const int* targets,
                         float dloss);
  // Forward only (validation): mean loss; every activation is freed after its last use.
  float forward_loss(const void* params, const int* inputs, const int* targets);
  // Forward only: logits (Vp, host fp32) of row (b = 0, t = pos), for sampling. Columns >= V
  // are -inf.
  void forward_logits(const void* params, const int* inputs, int pos, float* logits);

  const ArenaStats& stats() const;
  void reset_peaks();
  Arena& arena();
  Stream* main_stream();
  Stream* side_stream();
  Backend& backend();
  const Plan& plan() const;
  int B() const;
  int T() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
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
               const ScheduleOptions& opt, const CostModel& m);

}  // namespace remat
