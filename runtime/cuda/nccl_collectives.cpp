// The NCCL collectives (runtime/cuda/nccl_collectives.h). Compiled only with NCCL and MPI
// (REMAT_WITH_NCCL); otherwise this file is empty.
#ifdef REMAT_WITH_NCCL
#include "runtime/cuda/nccl_collectives.h"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "kernels/cuda_common.cuh"

namespace remat {
namespace {

ncclDataType_t nccl_type(ActDType dt) {
  return dt == ActDType::kBF16 ? ncclBfloat16 : ncclFloat32;
}

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

class NcclCollectives final : public Collectives {
 public:
  NcclCollectives(Backend& be, int rank, int world, double timeout_s, int stream_id)
      : Collectives(rank, world, timeout_s), stream_(be.make_stream("remat-comm", stream_id)) {
    // Rank 0's id to every rank over MPI (the others send nothing).
    ncclUniqueId id;
    std::memset(&id, 0, sizeof id);
    if (rank == 0) REMAT_NCCL_CHECK(ncclGetUniqueId(&id));
    const std::string mine = rank == 0 ? std::string(id.internal, sizeof id.internal) : "";
    const std::vector<std::string> all = mpi_host_all_gather(mine, 10 * timeout_s);
    REMAT_CHECK(all[0].size() == sizeof id.internal, "NCCL: rank 0 sent no unique id");
    std::memcpy(id.internal, all[0].data(), sizeof id.internal);
    REMAT_NCCL_CHECK(ncclCommInitRank(&comm_, world, id, rank));
    REMAT_CUDA_CHECK(cudaGetDevice(&device_));
    watchdog_ = std::thread([this] { watch(); });
  }

  ~NcclCollectives() override {
    try {
      stream_->synchronize();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "remat: communication stream: %s\n", e.what());
    }
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    watchdog_.join();
    for (const Pending& p : pending_) cudaEventDestroy(p.done);
    for (cudaEvent_t e : free_events_) cudaEventDestroy(e);
    ncclCommDestroy(comm_);
  }

  const char* name() const override { return "nccl"; }
  Stream* stream() override { return stream_.get(); }

  void group_begin() override {
    REMAT_CHECK(!in_group_, "collectives: group_begin inside a group");
    in_group_ = true;
  }
  void group_end(const char* label) override {
    REMAT_CHECK(in_group_, "collectives: group_end without group_begin");
    in_group_ = false;
    flush(label);
  }

  void reduce_sum(const void* send, void* recv, size_t n, ActDType dt, int root, Accumulate acc,
                  const char* label) override {
    REMAT_CHECK(acc == Accumulate::kNo, "NCCL collectives: a reduction cannot accumulate");
    REMAT_CHECK(root >= 0 && root < world(), "collectives: root out of range");
    REMAT_CHECK(rank() != root || recv != nullptr, "reduce_sum: no destination on the root");
    add(
        [=](ncclComm_t c, cudaStream_t s) {
          // Non-roots pass their send buffer as recvbuff (NCCL ignores it there).
          REMAT_NCCL_CHECK(ncclReduce(send, recv ? recv : const_cast<void*>(send), n, nccl_type(dt),
                                      ncclSum, root, c, s));
        },
        label);
  }

  void broadcast(const void* send, void* recv, size_t n, ActDType dt, int root,
                 const char* label) override {
    REMAT_CHECK(root >= 0 && root < world(), "collectives: root out of range");
    add(
        [=](ncclComm_t c, cudaStream_t s) {
          REMAT_NCCL_CHECK(ncclBroadcast(send ? send : recv, recv, n, nccl_type(dt), root, c, s));
        },
        label);
  }

  void all_reduce_sum(void* buf, size_t n, ActDType dt, const char* label) override {
    add(
        [=](ncclComm_t c, cudaStream_t s) {
          REMAT_NCCL_CHECK(ncclAllReduce(buf, buf, n, nccl_type(dt), ncclSum, c, s));
        },
        label);
  }

  std::vector<std::string> host_all_gather(const std::string& mine, double timeout_s) override {
    REMAT_CHECK(!in_group_, "collectives: a host op inside a group");
    stream_->synchronize();  // bounded by the watchdog
    return mpi_host_all_gather(mine, timeout_s > 0 ? timeout_s : this->timeout_s());
  }

 private:
  using Op = std::function<void(ncclComm_t, cudaStream_t)>;
  struct Pending {
    cudaEvent_t done;
    const char* label;
    double enqueued_s;
  };

  void add(Op op, const char* label) {
    ops_.push_back(std::move(op));
    if (!in_group_) flush(label);
  }

  // One stream item: the group's NCCL calls enqueued on the stream, then an event the
  // watchdog follows.
  void flush(const char* label) {
    if (ops_.empty()) return;
    std::vector<Op> ops = std::move(ops_);
    ops_.clear();
    stream_->launch(
        [this, ops = std::move(ops), label] {
          cudaStream_t s = static_cast<cudaStream_t>(stream_->native());
          REMAT_NCCL_CHECK(ncclGroupStart());
          for (const Op& op : ops) op(comm_, s);
          REMAT_NCCL_CHECK(ncclGroupEnd());
          cudaEvent_t ev = take_event();
          REMAT_CUDA_CHECK(cudaEventRecord(ev, s));
          {
            std::lock_guard<std::mutex> lk(mu_);
            pending_.push_back({ev, label, now_s()});
          }
          cv_.notify_all();
        },
        label);
  }

  cudaEvent_t take_event() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!free_events_.empty()) {
        cudaEvent_t e = free_events_.back();
        free_events_.pop_back();
        return e;
      }
    }
    cudaEvent_t e;
    REMAT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
  }

  // The watchdog: the oldest group must complete within timeout_s() of being enqueued or of
  // the completion of the one before it, whichever is later.
  void watch() {
    cudaSetDevice(device_);
    std::unique_lock<std::mutex> lk(mu_);
    double progress = now_s();
    while (!stop_) {
      cv_.wait_for(lk, std::chrono::milliseconds(100));
      while (!pending_.empty()) {
        Pending& p = pending_.front();
        const cudaError_t st = cudaEventQuery(p.done);
        if (st == cudaErrorNotReady) {
          const double since = now_s() - std::max(progress, p.enqueued_s);
          if (since <= timeout_s()) break;
          char t[32];
          std::snprintf(t, sizeof t, "%g", timeout_s());
          ncclCommAbort(comm_);
          abort_job("rank " + std::to_string(rank()) + ": NCCL " + p.label +
                        " did not complete for " + t +
                        " s (--comm-timeout): a rank died or stalls; ending the job on every rank",
                    3);
        }
        free_events_.push_back(p.done);
        pending_.pop_front();
        progress = now_s();
      }
      if (pending_.empty()) progress = now_s();
    }
  }

  std::unique_ptr<Stream> stream_;
  ncclComm_t comm_ = nullptr;
  int device_ = 0;
  bool in_group_ = false;
  std::vector<Op> ops_;  // host thread: the open group
  std::mutex mu_;        // pending_, free_events_, stop_
  std::condition_variable cv_;
  std::deque<Pending> pending_;
  std::vector<cudaEvent_t> free_events_;
  bool stop_ = false;
  std::thread watchdog_;  // last: started once everything above exists
};

void select_device(int local_rank) {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();  // no device: the CPU backend (or an error naming it) follows
    return;
  }
  REMAT_CUDA_CHECK(cudaSetDevice(local_rank % n));
}

}  // namespace

std::unique_ptr<Collectives> make_nccl_collectives(Backend& backend, double timeout_s,
                                                   int stream_id) {
  REMAT_REQUIRE(std::string(backend.name()) == "cuda",
                "the NCCL collectives need the CUDA backend");
  REMAT_REQUIRE(timeout_s > 0, "--comm-timeout must be > 0 seconds");
  int rank = 0, world = 1;
  mpi_rank_world(&rank, &world);
  return std::make_unique<NcclCollectives>(backend, rank, world, timeout_s, stream_id);
}

void install_nccl_collectives() {
  NcclHooks h;
  h.select_device = select_device;
  h.create = make_nccl_collectives;
  register_nccl_collectives(h);
}

}  // namespace remat
#endif  // REMAT_WITH_NCCL
