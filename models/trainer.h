// The training loop: gradient accumulation, gradient clipping, AdamW with a warmup + cosine
// or constant schedule, non-finite step handling, evaluation, sampling and checkpoints.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/shards.h"
#include "io/train_state.h"
#include "models/data_parallel.h"
#include "models/model.h"

namespace remat {

struct Hyper {
  float lr = 3e-4f;           // peak learning rate
  int warmup = 0;             // linear warmup steps
  bool cosine = false;        // cosine decay to lr * final_frac over the run, else constant
  float final_frac = 0.1f;    // cosine end point as a fraction of lr
  float weight_decay = 0.0f;  // AdamW decoupled decay, matrices only
  float beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f;
  float grad_clip = 1.0f;  // max global gradient norm; 0 = off
  int total_steps = 1;     // for the schedule
};
float learning_rate(const Hyper& h, int64_t step);  // step is 0-based

struct StepResult {
  float loss = 0;       // mean over the total batch
  float grad_norm = 0;  // before clipping
  float lr = 0;
  bool skipped = false;  // loss or gradient norm not finite: no update was applied
};

// Weights, gradients and AdamW state live in the backend's memory: on the CPU fp32 host
// vectors; on CUDA fp32 master weights and moments on the device beside the working weights
// and gradients in the backend's element type (bf16, or fp32 with --dtype fp32). The host
// copies (params(), grads(), state()) are fetched on request.
//
// A step's gradient is the left fold of its micro-batches' gradients (models/data_parallel.h):
// on the CPU with accum > 1, micro-batch 0 is written straight into the gradient buffer and
// each later one into a zeroed buffer of its own that is then added; on CUDA the backward
// adds every micro-batch into the one buffer. With data parallel (dp.comm with a world > 1)
// each step is collective: every rank calls step(), evaluate() reads the whole validation
// set on every rank, and params() and state() gather ZeRO-1's shards (every rank calls them).
class Trainer {
 public:
  // params: initial weights (num_params(c)); m, v start at zero unless restored.
  // backend nullptr = the CPU backend.
  Trainer(const ModelConfig& c, int B, int T, int accum, const Hyper& h, Plan plan,
          ScheduleOptions sched, std::vector<float> params, Backend* backend = nullptr,
          const DataParallelOptions& dp = {});
  ~Trainer();
  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  // One optimizer step over `accum` micro-batches from `data`.
  StepResult step(DataLoader& data);
  // Mean loss over `batches` batches from `data` (which is reset first).
  float evaluate(DataLoader& data, int batches);

  const ModelConfig& config() const { return c_; }
  int64_t steps_done() const { return step_; }
  // fp32 host copies of the weights (the master weights) and of the last step's gradients
  // (data parallel: the reduced gradient, but with ZeRO-1 this rank's last micro-batch's).
  const std::vector<float>& params();
  const std::vector<float>& grads();
  ModelRunner& runner() { return runner_; }
  Backend& backend() { return *be_; }
  DataParallel* data_parallel() { return dp_.get(); }  // null in one process
  Hyper& hyper() { return h_; }

  // Whole state for a checkpoint / restore from one (config must match).
  TrainState state(const DataLoader& data);
  void restore(const TrainState& s);

  // Test-only: make the loss of steps [first, last] (0-based) NaN, to exercise skip handling.
  void inject_nan_steps(int64_t first, int64_t last) {
    nan_first_ = first;
    nan_last_ = last;
  }

 private:
  bool on_host() const { return be_ == cpu_backend(); }
  // Weights (master and working copy) and moments from s (moments zero when s has none).
  void load_weights_and_moments(const TrainState& s);
  void put_state(float* dst, const float* host, size_t n);
  void get_state(float* host, const float* src, size_t n);
  // The step's micro-batches: into grads_dev_ (the CPU's single-process fold included), or,
  // with data parallel, each reduced under the backward pass. Returns the mean loss.
  float accumulate(DataLoader& data);
  // Sum of squares of the step's gradient (reduced across ranks with data parallel).
  double grad_sum_squares();

  ModelConfig c_;
  int B_, T_, accum_;
  Hyper h_;
  Backend* be_;
  ModelRunner runner_;
  size_t n_ = 0;  // parameters
  // Host vectors: the CPU backend's state itself, the CUDA backend's on-request copies.
  std::vector<float> params_, grads_, m_, v_;
  // Backend memory: master weights, moments (fp32); working weights, gradients (Elem). On the
  // CPU these point into the vectors above and weights == master.
  float *master_ = nullptr, *m_dev_ = nullptr, *v_dev_ = nullptr;
  void *weights_ = nullptr, *grads_dev_ = nullptr;
  bool offload_optimizer_ = false;  // master_, m_dev_, v_dev_ are pinned host memory
  // The CPU's single-process fold (accum > 1): the gradient of micro-batches 1, 2, ...
  std::vector<float> micro_;
  // Data parallel: the rank's part; in fold mode (CPU) its shard's gradient accumulator.
  std::unique_ptr<DataParallel> dp_;
  std::vector<float> acc_;
  // The optimizer's range of the flat buffer: m_dev_ and v_dev_ hold elements [opt_begin_,
  // opt_begin_ + opt_n_) (all of them, or this rank's shard with ZeRO-1), and so does
  // master_ when master_sharded_ (ZeRO-1 with a separate working copy), else all n_.
  size_t opt_begin_ = 0, opt_n_ = 0;
  bool master_sharded_ = false;
  std::vector<int> inputs_, targets_;
  int64_t step_ = 0;
  int64_t nan_first_ = -1, nan_last_ = -2;
};

// Generates `n` tokens after `prompt` (at least one token) by sampling at `temperature`
// (0 = greedy) with a counter-based generator at (seed, stream). Context: the last
// max_seq_len tokens.
std::vector<int> sample_tokens(const ModelConfig& c, const float* params,
                               const std::vector<int>& prompt, int n, float temperature,
                               uint64_t seed, uint64_t stream);

}  // namespace remat
