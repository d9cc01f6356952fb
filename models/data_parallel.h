// Data parallel training (../shared/DESIGN.md "Data parallel"): what the trainer needs beside
// the collectives (runtime/collectives.h) to make W ranks train as one process does.
//
// The contract, on the CPU backend bit for bit: W ranks at micro-batch B with `a`
// accumulation steps compute what one process computes at --total-batch W a B T. That holds
// because both sides define one step's gradient the same way:
//   the M = W a micro-batches of a step, m = 0 .. M-1 in the data's order, each gradient g_m
//   computed from zero (a backward pass into a zeroed buffer), are added as a left fold:
//   G = ((g_0 + g_1) + g_2) + ... (g_0 copied, one rounding per addition).
// Rank r computes m = j W + r in its micro-step j (it reads batch (k W + r) of the data, as
// llm.c does); the reduction of micro-step j folds the ranks' buffers in rank order onto
// what micro-steps 0 .. j-1 left, which is exactly that fold. One process (the trainer with
// accum > 1 on the CPU) folds its micro-batches the same way, instead of letting the
// backward add each one into the previous ones' sum (a kernel that adds its terms to the
// stored value one by one would round differently). The loss is the same kind of fold (in
// double, in m order), the gradient norm is cpu::sum_squares's own block sums combined in
// block order, and AdamW is elementwise, so with ZeRO-1 each rank updating its shard gives
// the bits of one update of everything.
//
// The CUDA backend (NCCL) keeps its single-GPU accumulation (the backward adds micro-batches
// into one bf16 buffer) and reduces once, in the last micro-step, with NCCL's sum: the same
// bits from run to run on the same ranks and topology, not the bits of one GPU.
//
// Buffers are split into W contiguous shards (ShardLayout); the owner of a shard is the root
// of every reduction into it. Gradients are reduced in buckets: parameters in the order the
// backward pass finishes them (a dry run of the executor tells), cut into buckets of about
// bucket_bytes, each reduced on the communication stream as soon as its last gradient is
// written (the executor's grad-ready hook), overlapped with the rest of the backward pass.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "io/shards.h"
#include "models/model.h"
#include "runtime/collectives.h"
#include "runtime/executor.h"

namespace remat {

struct DataParallelOptions {
  Collectives* comm = nullptr;             // null (or a world of 1): one process
  size_t bucket_bytes = size_t(25) << 20;  // gradient bytes per reduction (the last: less)
  int zero = 0;                            // 1: ZeRO-1, the optimizer state sharded by rank
};

// The collectives for a backend: MPI for the CPU, NCCL for CUDA (Error when not built).
std::unique_ptr<Collectives> make_collectives(Backend& backend, double timeout_s);

// [0, n) split into `world` contiguous shards whose boundaries are multiples of kAlign
// elements (cpu::sum_squares's block, so a shard's block sums are the whole buffer's).
// Trailing shards may be short or empty.
class ShardLayout {
 public:
  static constexpr size_t kAlign = 4096;
  ShardLayout(size_t n = 0, int world = 1);
  size_t begin(int r) const { return std::min(n_, per_ * static_cast<size_t>(r)); }
  size_t end(int r) const { return std::min(n_, per_ * static_cast<size_t>(r + 1)); }
  size_t size(int r) const { return end(r) - begin(r); }
  int owner(size_t i) const { return static_cast<int>(i / per_); }
  int world() const { return world_; }
  size_t n() const { return n_; }

 private:
  size_t n_, per_;
  int world_;
};

// A piece of a bucket: elements [offset, offset + count) of the flat buffer, all in the
// shard of `owner`.
struct BucketPiece {
  size_t offset = 0, count = 0;
  int owner = 0;
};
struct GradBucket {
  std::vector<ParamId> params;      // in the order the backward finishes them
  std::vector<BucketPiece> pieces;  // the params' ranges cut at shard boundaries, same order
  size_t elems = 0;
};
// Buckets over parameters in `order` (each listed once), closed when they reach bucket_elems.
std::vector<GradBucket> make_buckets(const Program& p, const std::vector<ParamId>& order,
                                     size_t bucket_elems, const ShardLayout& shards);
// The order in which the backward pass finishes the parameters' gradients (a dry run).
std::vector<ParamId> grad_ready_order(std::shared_ptr<const Program> p, const Plan& plan,
                                      ActDType dt, const ScheduleOptions& so);

enum class ReduceMode {
  kFold,     // every micro-step, fp32 left fold into this rank's shard accumulator (MPI)
  kInPlace,  // once, in the last micro-step, in the gradient buffer itself (NCCL)
};

// One rank's part of data parallel training: the batches it reads, the bucketed gradient
// reduction under the backward pass, and the reductions of the loss, the gradient norm and
// the weights. The calls below are collective (every rank makes them, in the same order).
class DataParallel {
 public:
  DataParallel(Collectives& comm, const Program& p, std::vector<ParamId> order, size_t bucket_bytes,
               bool zero, ActDType dt, ReduceMode mode);

  Collectives& comm() { return comm_; }
  int rank() const { return comm_.rank(); }
  int world() const { return comm_.world(); }
  bool zero() const { return zero_; }
  ReduceMode mode() const { return mode_; }
  const ShardLayout& shards() const { return shards_; }
  size_t shard_begin() const { return shards_.begin(rank()); }
  size_t shard_size() const { return shards_.size(rank()); }
  const std::vector<GradBucket>& buckets() const { return buckets_; }

  // The next micro-batch of this rank: of the next W batches of `data`, the rank-th (every
  // rank's loader passes over all W, so all stand where one process would).
  void next_batch(DataLoader& data, int* inputs, int* targets);

  // Micro-step j of `accum`: the gradient buffer the backward pass writes (n Elems) and, in
  // fold mode, this rank's shard accumulator (shard_size() fp32). After the last micro-step
  // without ZeRO, grads holds the reduced gradient on every rank; with ZeRO the shard does
  // (fold: in acc; in place: grads[shard_begin() ...]).
  void begin_micro_step(int j, int accum, void* grads, float* acc);
  // The executor's grad-ready hook.
  void on_grad_ready(ParamId q, Stream* main);
  // After forward_backward: an event after every reduction of this micro-step.
  Event end_micro_step();

  // The step's mean loss from each rank's micro-step losses (fold in m = j W + r order, in
  // double, divided by W a): the one-process value.
  float mean_loss(const std::vector<float>& mine);
  // The global sum of squares from this rank's part: fold mode, the kAlign-block sums of its
  // shard (added in block order across ranks); in place, one partial per rank.
  double sum_squares(const std::vector<double>& mine);
  // ZeRO: every rank's weights (n Elems, working copy) = their owners' shards (stream op).
  void broadcast_shards(void* weights, size_t elem_bytes, const char* label);
  // Host vectors of every rank's shard -> the whole buffer (n values) on every rank.
  std::vector<float> gather_shards(const std::vector<float>& mine);
  // True on every rank when `mine` is true on any (the same answer everywhere).
  bool any(bool mine);

 private:
  Collectives& comm_;
  ShardLayout shards_;
  std::vector<ParamId> order_;
  std::vector<GradBucket> buckets_;
  std::vector<int> bucket_of_last_;  // per ParamId: the bucket it closes, -1 none
  bool zero_;
  ActDType dt_;
  size_t es_;
  ReduceMode mode_;
  std::vector<int> skip_in_, skip_tg_;  // batches of the other ranks
  // The running micro-step.
  int j_ = 0, accum_ = 1;
  void* grads_ = nullptr;
  float* acc_ = nullptr;
  size_t next_ = 0;      // index into order_ of the next gradient expected
  int next_bucket_ = 0;  // buckets issued so far
  bool reducing_ = false;
};

// Refuses, before step 1 and on every rank, ranks that disagree: each field (name, value)
// is hashed, the hashes gathered, and the first field where a rank differs from rank 0 is an
// Error naming the field, the ranks and both values (shortened).
void check_ranks_agree(Collectives& comm,
                       const std::vector<std::pair<std::string, std::string>>& fields,
                       double timeout_s);

// What data parallel changes in one rank's memory (remat plan --world N [--zero 1]).
struct DataParallelMemory {
  int world = 1;
  bool zero = false;
  uint64_t shard_params = 0;     // parameters in the largest shard (rank 0's)
  uint64_t optimizer_bytes = 0;  // per rank: all of it, or its shard with ZeRO-1
  // fp32 (the CPU backend): the shard's gradient accumulator and the received buckets a
  // reduction folds (world x bucket_bytes at most); bf16 (CUDA): none besides NCCL's own.
  uint64_t comm_bytes = 0;
};
// Adjusts a one-process report to one rank's: the optimizer state and the totals (device, or
// host with the optimizer state offloaded).
DataParallelMemory apply_data_parallel(MemoryReport& r, uint64_t num_params, ActDType dt, int world,
                                       bool zero, uint64_t bucket_bytes);

// FNV-1a of bytes (the agreement check's hash, and a fingerprint of weights).
uint64_t fnv1a64(const void* data, size_t bytes, uint64_t h = 1469598103934665603ull);

}  // namespace remat
