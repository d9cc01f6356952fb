// Test-only collectives: W ranks as threads of one process (runtime/collectives.h's contract,
// exact rank-order folds like the MPI implementation), so the data-parallel trainer runs
// where there is no MPI and under ThreadSanitizer and AddressSanitizer, where Open MPI is
// not instrumented. Each rank's communication stream is a CPU stream; a group is one item
// that publishes its ops, meets the other ranks at a barrier, reads their buffers, and meets
// them again before anyone writes.
#pragma once
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "base/error.h"
#include "runtime/collectives.h"

namespace remat::test {

// What the ranks share: a barrier and one published pointer per rank.
class ThreadHub {
 public:
  explicit ThreadHub(int world) : world_(world), slot_(world, nullptr) {}
  int world() const { return world_; }

  // Publishes p for this rank (unless null: a plain barrier, the slots stay) and waits for
  // every rank to arrive; Error after timeout_s. A slot is read between a publishing meeting
  // and the plain one after it, so nobody overwrites it while another reads.
  void meet(int rank, const void* p, double timeout_s) {
    std::unique_lock<std::mutex> lk(mu_);
    if (p != nullptr) slot_[rank] = p;
    const uint64_t gen = gen_;
    if (++arrived_ == world_) {
      arrived_ = 0;
      gen_++;
      cv_.notify_all();
      return;
    }
    if (!cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), [&] { return gen_ != gen; }))
      throw Error("thread collectives: rank " + std::to_string(rank) + " waited " +
                  std::to_string(timeout_s) + " s for the other ranks");
  }
  // Rank p's pointer of the current meeting (valid between two meet() calls).
  const void* slot(int p) {
    std::lock_guard<std::mutex> lk(mu_);
    return slot_[p];
  }

 private:
  int world_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  uint64_t gen_ = 0;
  std::vector<const void*> slot_;
};

class ThreadCollectives final : public Collectives {
 public:
  ThreadCollectives(ThreadHub& hub, int rank, double timeout_s = 60)
      : Collectives(rank, hub.world(), timeout_s),
        hub_(hub),
        stream_(make_cpu_stream("remat-comm", 3)) {}
  ~ThreadCollectives() override {
    try {
      stream_->synchronize();
    } catch (...) {
    }
  }

  const char* name() const override { return "threads"; }
  Stream* stream() override { return stream_.get(); }
  void group_begin() override { in_group_ = true; }
  void group_end(const char* label) override {
    in_group_ = false;
    flush(label);
  }
  void reduce_sum(const void* send, void* recv, size_t n, ActDType, int root, Accumulate acc,
                  const char* label) override {
    add({Kind::kReduce, send, recv, n, root, acc}, label);
  }
  void broadcast(const void* send, void* recv, size_t n, ActDType, int root,
                 const char* label) override {
    add({Kind::kBroadcast, send, recv, n, root, Accumulate::kNo}, label);
  }
  void all_reduce_sum(void* buf, size_t n, ActDType, const char* label) override {
    add({Kind::kAllReduce, buf, buf, n, 0, Accumulate::kNo}, label);
  }
  std::vector<std::string> host_all_gather(const std::string& mine, double timeout_s) override {
    std::vector<std::string> out(world());
    const double t = timeout_s > 0 ? timeout_s : this->timeout_s();
    stream_->launch(
        [&] {
          hub_.meet(rank(), &mine, t);
          for (int p = 0; p < world(); p++) out[p] = *static_cast<const std::string*>(hub_.slot(p));
          hub_.meet(rank(), nullptr, t);
        },
        "comm.host");
    stream_->synchronize();
    return out;
  }

 private:
  enum class Kind { kReduce, kBroadcast, kAllReduce };
  struct Op {
    Kind kind;
    const void* send;
    void* recv;
    size_t n;
    int root;
    Accumulate acc;
  };
  using Ops = std::vector<Op>;

  void add(const Op& op, const char* label) {
    pending_.push_back(op);
    if (!in_group_) flush(label);
  }
  void flush(const char* label) {
    if (pending_.empty()) return;
    auto ops = std::make_shared<Ops>(std::move(pending_));
    pending_.clear();
    stream_->launch([this, ops] { run(*ops); }, label);
  }

  // dst = (dst +) src(0) + src(1) + ..., ranks in order.
  template <typename Src>
  void fold(float* dst, const Src& src, size_t n, Accumulate acc) {
    for (int p = 0; p < world(); p++) {
      const float* s = src(p);
      if (p == 0 && acc == Accumulate::kNo) {
        std::memmove(dst, s, n * sizeof(float));
        continue;
      }
      for (size_t i = 0; i < n; i++) dst[i] += s[i];
    }
  }

  void run(const Ops& ops) {
    const int me = rank();
    hub_.meet(me, &ops, timeout_s());
    std::vector<const Ops*> all(world());
    for (int p = 0; p < world(); p++) all[p] = static_cast<const Ops*>(hub_.slot(p));
    std::vector<std::vector<float>> later(ops.size());  // all-reduce results, written last
    for (size_t k = 0; k < ops.size(); k++) {
      const Op& op = ops[k];
      auto send_of = [&](int p) { return static_cast<const float*>((*all[p])[k].send); };
      if (op.kind == Kind::kReduce && op.root == me) {
        std::vector<float> own;
        if (op.send == op.recv) own.assign(send_of(me), send_of(me) + op.n);
        fold(
            static_cast<float*>(op.recv),
            [&](int p) { return p == me && !own.empty() ? own.data() : send_of(p); }, op.n, op.acc);
      } else if (op.kind == Kind::kBroadcast && op.recv != send_of(op.root)) {
        std::memcpy(op.recv, send_of(op.root), op.n * sizeof(float));
      } else if (op.kind == Kind::kAllReduce) {
        later[k].resize(op.n);
        fold(later[k].data(), send_of, op.n, Accumulate::kNo);
      }
    }
    hub_.meet(me, nullptr, timeout_s());  // every rank has read what it needed
    for (size_t k = 0; k < ops.size(); k++)
      if (!later[k].empty()) std::memcpy(ops[k].recv, later[k].data(), ops[k].n * sizeof(float));
  }

  ThreadHub& hub_;
  std::unique_ptr<Stream> stream_;
  bool in_group_ = false;
  Ops pending_;
};

}  // namespace remat::test
