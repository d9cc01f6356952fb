// --fit: the plan with the least modelled step time whose whole device footprint fits a size.
//
// The device footprint of a run is its state (weights, gradients and, unless offloaded, the
// fp32 master weights and AdamW moments) plus the arena's peak (activations and workspace,
// from a dry run of the real schedule). The choices: the optimizer state on the device or in
// host memory; nothing offloaded, the block inputs, or the inputs and every saved tensor the
// plan keeps ("input+kept"); and per saved tensor keep or recompute
// (the budget planner, runtime/plan.h, given the bytes left for the arena). The modelled
// step time adds to the compute the recompute time, the part of the copy traffic the copy
// stream cannot hide under the compute it overlaps (copies out under the forward pass,
// copies back under the backward pass), and the optimizer state's traffic across the link.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "runtime/executor.h"

namespace remat {

// Device bytes of weights, gradients and optimizer state for n parameters.
uint64_t state_device_bytes(uint64_t n, ActDType dt, bool offload_optimizer);
// Host bytes of the optimizer state when it is offloaded (0 when not).
uint64_t state_host_bytes(uint64_t n, ActDType dt, bool offload_optimizer);

struct FitChoice {
  Plan plan;                       // recompute and offload decisions
  bool offload_optimizer = false;  // --offload-optimizer
  uint64_t device_bytes = 0;       // state + arena peak
  uint64_t host_bytes = 0;         // offloaded activations + optimizer state
  double compute_seconds = 0;      // the step without recompute or copies, modelled
  double recompute_seconds = 0;
  double exposed_copy_seconds = 0;  // activation copies the copy stream cannot hide
  double optimizer_link_seconds = 0;
  double seconds() const {
    return compute_seconds + recompute_seconds + exposed_copy_seconds + optimizer_link_seconds;
  }
  std::string describe() const;  // "--recompute selective --offload input --offload-optimizer"
};

// The modelled costs of a given choice (its device and host bytes from a dry run).
FitChoice evaluate_choice(const Plan& plan, bool offload_optimizer,
                          std::shared_ptr<const Program> p, ActDType dt, const ScheduleOptions& opt,
                          const CostModel& m);

// The least modelled step time that fits `device_budget` bytes. Throws remat::Error naming
// the budget and the smallest feasible one (full recompute, inputs and optimizer offloaded)
// when nothing fits.
FitChoice fit_plan(uint64_t device_budget, std::shared_ptr<const Program> p, ActDType dt,
                   const ScheduleOptions& opt, const CostModel& m);

}  // namespace remat
