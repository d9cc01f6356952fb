// The executor: runs a Program (runtime/program.h) under a Plan on a Backend.
//
// - forward: ops in order on the main stream; a tensor is freed after its last forward use
//   unless the plan keeps it (a saved tensor that is not recomputed, or a checkpoint);
// - backward: ops in reverse, each op's backward on its saved tensors; parameter gradients
//   accumulate into the flat gradient buffer, activation gradients are arena blocks freed
//   after their last use (a residual sum hands its gradient buffer on to both inputs);
// - recompute: block l's freed tensors are rebuilt on the side stream by the smallest replay
//   of block l's own forward ops from what is still stored, issued `lookahead` blocks ahead
//   of the backward pass, with a ready event the main stream waits on before it reads them;
//   the replay runs the forward's own kernels on the forward's own inputs, so it is bitwise
//   identical (`verify_recompute` checks it, naming block, tensor and index);
// - offload: a tensor the plan offloads is copied to a host arena (pinned on CUDA: one
//   reservation sized by the dry run) on the copy stream after its last forward use, its
//   device bytes freed when the copy has read them, and fetched back with the look-ahead
//   ahead of its block's backward (and of its block's replay, which may read it), with an
//   event the main and recompute streams wait on; the bytes come back unchanged, so training
//   is bitwise that of keeping it (`verify_recompute` checks fetched tensors too);
// - dry run: the same calls with null streams and an arena with no memory: the prediction of
//   every peak (the arena of a real executor is sized by one).
// Nothing is allocated inside a step: one arena reservation, the backend's scratch sized when
// the executor is made.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "runtime/arena.h"
#include "runtime/backend.h"
#include "runtime/plan.h"
#include "runtime/program.h"
#include "runtime/stream.h"

namespace remat {

struct ScheduleOptions {
  int lookahead = 1;              // blocks the side stream rebuilds ahead of the backward pass
  bool verify_recompute = false;  // keep originals, compare every recomputed tensor bit for bit
  int classifier_chunk = 0;       // rows per classifier chunk; 0 = automatic (64 MiB of logits)
  // For the trainer, not the executor: fp32 master weights and AdamW moments in the backend's
  // (pinned, device-visible) host memory instead of device memory (--offload-optimizer).
  bool offload_optimizer = false;
  // Test-only: the main stream does not wait for the recompute-ready event (a missing event),
  // and the side stream sleeps this long before each block's recompute (CPU backend; on CUDA
  // the sleep holds the one host thread that enqueues for both streams, so it delays all).
  bool debug_skip_ready_wait = false;
  int debug_recompute_delay_ms = 0;
};

// The device the cost model assumes (a roofline: the larger of compute and memory time).
struct CostModel {
  double flops_per_s = 1e11;
  double bytes_per_s = 2e10;
  // Host <-> device copies (the offload link): PCIe on CUDA; the CPU backend's copy thread.
  double link_bytes_per_s = 1e10;
};

// Per training step, what a plan's offloads move over the link: every offloaded tensor out
// after the forward pass and back before the backward pass.
struct CopyCost {
  uint64_t bytes = 0;  // both directions
  double seconds = 0;  // at the link's bandwidth
};
CopyCost copy_cost(const Program& p, const Plan& plan, int elem_bytes, const CostModel& m);
double op_seconds(const OpDesc& op, int elem_bytes, const CostModel& m, bool norm_only = false);

// One op of a block's recompute replay and what becomes of each of its outputs.
enum class ReplayRole : uint8_t {
  kTarget,   // a tensor the plan freed: rebuilt and kept for the backward pass
  kTemp,     // needed by a later op of the replay only: freed after its last use there
  kScratch,  // written because the op writes it, not needed: freed at once
  kSkip,     // not written (the norm-only replay of a residual LayerNorm skips the sum)
};
struct ReplayStep {
  int op = -1;
  bool norm_only = false;            // residual LayerNorm rebuilt from its stored sum
  std::vector<ReplayRole> roles;     // per output
  std::vector<TensorId> free_after;  // temps whose last replay use is this step
};
// The smallest replay that rebuilds the tensors `plan` frees in `block`, from stored tensors
// only. Throws remat::Error when the plan frees something no replay can rebuild.
std::vector<ReplayStep> replay_of(const Program& p, const Plan& plan, int block);

// Modelled recompute work of a plan (per training step), from the replays.
struct RecomputeCost {
  double flops = 0, seconds = 0;
};
RecomputeCost recompute_cost(const Program& p, const Plan& plan, int elem_bytes,
                             const CostModel& m);
// Per slot: bytes it frees and the cost of rebuilding it alone (block 0's copy).
std::vector<SlotCost> slot_costs(const Program& p, int elem_bytes, const CostModel& m);

class Executor {
 public:
  // dry = true: null streams and an arena with no memory; the same schedule runs, nothing
  // executes, and stats() is the prediction (dtype only sizes the tensors). dry = false: the
  // backend's streams and one reservation of its memory sized by a dry run of the same
  // schedule; dtype must be the backend's. backend nullptr = the CPU backend.
  Executor(std::shared_ptr<const Program> program, Plan plan, ActDType dtype, ScheduleOptions opt,
           bool dry, Backend* backend = nullptr);
  ~Executor();

  // One forward and backward pass. params and grads: Program::num_params elements of the
  // backend's dtype in its memory, laid out as the program's ParamDescs say; params are read,
  // grads accumulated (+=). inputs, targets (B*T) host token ids, already checked < V. dloss
  // scales the gradient of the summed loss. Returns the mean loss.
  float forward_backward(const void* params, void* grads, const int* inputs, const int* targets,
                         float dloss);
  // Forward only (validation): mean loss; every tensor is freed after its last use.
  float forward_loss(const void* params, const int* inputs, const int* targets);
  // Forward only: logits (Vp, host fp32) of row (b = 0, t = pos); columns >= V are -inf.
  void forward_logits(const void* params, const int* inputs, int pos, float* logits);

  // Called on the host during forward_backward, right after the last kernel that writes a
  // parameter's gradient has been enqueued on the main stream (parameters in the order the
  // backward pass finishes them; a tied parameter after its last user): work that reads that
  // gradient (a data-parallel reduction) may start once `main` gets there (record an event
  // on it). main is null in a dry run. An empty hook (the default) does nothing.
  using GradReadyHook = std::function<void(ParamId, Stream* main)>;
  void set_grad_ready_hook(GradReadyHook hook);

  const ArenaStats& stats() const;
  // The host arena's (offloaded activations; empty without offload).
  const ArenaStats& host_stats() const;
  void reset_peaks();
  Arena& arena();
  Stream* main_stream();
  Stream* side_stream();
  Stream* copy_stream();  // offload copies
  Backend& backend();
  const Plan& plan() const;
  const Program& program() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Activation peak of a plan by the dry run (the planner's peak_of).
uint64_t dry_run_activation_peak(std::shared_ptr<const Program> p, const Plan& plan, ActDType dt,
                                 const ScheduleOptions& opt);

// Resolves any --recompute policy for a program; budget:BYTES (activation bytes) by the
// planner with dry runs. *lower_bound_seconds: the planner's bound (0 for other policies).
Plan make_plan(const std::string& spec, std::shared_ptr<const Program> p, ActDType dt,
               const ScheduleOptions& opt, const CostModel& m,
               double* lower_bound_seconds = nullptr);

}  // namespace remat
