// CudaStream: remat::Stream over a cudaStream_t and pooled cudaEvent_t (contract in
// runtime/cuda/cuda_stream.h).
#include "runtime/cuda/cuda_stream.h"

#include <nvtx3/nvToolsExtCudaRt.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <deque>
#include <map>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#include "kernels/cuda_common.cuh"
#include "kernels/matmul.h"
#include "runtime/cuda/cupti_trace.h"
#include "runtime/trace_sink.h"

namespace remat {
namespace {

int64_t now_ns() {
  return steady_now_ns();
}

// CUPTI gives each activity record back with the label and the tag its op was opened with
// (CuptiOpScope). A traced CudaStream tags each op with a key and keeps the op's block, seq
// and launch time under that key, so every kernel record of the op maps back to it. Keys are unique
// in the process: work an op enqueued on another stream comes back to that stream, still with the
// key.
struct OpTag {
  const void* stream;  // the CudaStream whose launch() opened the op
  uint64_t seq;        // the op's position in that stream's launch order
  int block;           // the op's block, -1 when none
  int64_t launch_ns;   // host steady clock at its launch()
};

// A key lives until CUPTI can no longer deliver its op's records: cupti_trace.cpp forgets an op
// kMaxLateCollects (8) collects of its stream after the collect that completed it, and the
// stream collects once per synchronize(); this must stay above kMaxLateCollects + 1.
constexpr uint64_t kTagCollects = 16;

class OpTags {
 public:
  int add(const OpTag& t) {
    std::lock_guard<std::mutex> lk(mu_);
    next_ = next_ == INT_MAX ? 0 : next_ + 1;  // wraps long after a key expires
    tags_[next_] = t;
    return next_;
  }
  bool find(int key, OpTag* out) const {
    std::lock_guard<std::mutex> lk(mu_);
    const auto it = tags_.find(key);
    if (it == tags_.end()) return false;
    *out = it->second;
    return true;
  }
  void erase(const std::vector<int>& keys) {
    std::lock_guard<std::mutex> lk(mu_);
    for (int k : keys) tags_.erase(k);
  }

 private:
  mutable std::mutex mu_;  // a leaf: nothing else is locked while it is held
  std::unordered_map<int, OpTag> tags_;
  int next_ = -1;
};

// Never destroyed: a stream may be destroyed during static destruction.
OpTags& op_tags() {
  static OpTags* t = new OpTags;
  return *t;
}

class CudaStream final : public Stream {
 public:
  CudaStream(const std::string& name, int id, int priority) : Stream(name, id) {
    REMAT_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
    nvtxNameCudaStreamA(stream_, name.c_str());
  }

  // Waits for the stream's work, then frees everything (its cuBLASLt workspace included);
  // records not yet delivered are dropped. Never throws: errors go to stderr.
  ~CudaStream() override {
    const cudaError_t err = cudaStreamSynchronize(stream_);
    if (err != cudaSuccess)
      std::fprintf(stderr, "remat: stream '%s' destroyed with a pending error: %s\n",
                   name().c_str(), cudaGetErrorString(err));
    cuda::matmul_release_workspace(stream_);
    if (timing_ == Timing::kCupti) cupti_trace_detach(cupti_stream_);
    release_tags_locked(UINT64_MAX);  // no other thread may use a stream being destroyed
    for (auto& kv : recorded_) cudaEventDestroy(kv.second);
    for (cudaEvent_t ev : pool_) cudaEventDestroy(ev);
    for (const Pending& p : pending_) {
      cudaEventDestroy(p.start);
      cudaEventDestroy(p.end);
    }
    for (cudaEvent_t ev : timing_pool_) cudaEventDestroy(ev);
    if (anchor_) cudaEventDestroy(anchor_);
    cudaStreamDestroy(stream_);
  }

  void launch(std::function<void()> fn, const char* label, int block) override {
    cuda::NvtxRange range(label ? label : "op");
    Timing timing;
    uint32_t cupti_stream;
    uint64_t seq;           // this op's position in the launch order
    int64_t launch_ns = 0;  // read only while a sink is attached
    int key = 0;            // CUPTI: the op's key in op_tags()
    {
      std::lock_guard<std::mutex> lk(mu_);
      timing = timing_;
      cupti_stream = cupti_stream_;
      seq = ++launched_;
      if (timing != Timing::kNone) launch_ns = now_ns();
      if (timing == Timing::kCupti) {
        key = op_tags().add(OpTag{this, seq, block, launch_ns});
        tag_keys_.emplace_back(key, collects_);
      }
    }
    if (timing == Timing::kNone) {
      fn();
      return;
    }
    if (timing == Timing::kCupti) {
      const CuptiOpScope op(cupti_stream, label ? label : "", key);
      fn();
      return;
    }
    cudaEvent_t start, end;
    {
      std::lock_guard<std::mutex> lk(mu_);
      start = take_timing_event_locked();
      end = take_timing_event_locked();
    }
    REMAT_CUDA_CHECK(cudaEventRecord(start, stream_));
    try {
      fn();
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      timing_pool_.push_back(start);
      timing_pool_.push_back(end);
      throw;
    }
    REMAT_CUDA_CHECK(cudaEventRecord(end, stream_));
    std::lock_guard<std::mutex> lk(mu_);
    pending_.push_back(Pending{label ? label : "", block, start, end, seq, launch_ns});
  }

  Event record() override {
    std::lock_guard<std::mutex> lk(mu_);
    recycle_locked();
    cudaEvent_t ev;
    if (!pool_.empty()) {
      ev = pool_.back();
      pool_.pop_back();
    } else {
      REMAT_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    }
    REMAT_CUDA_CHECK(cudaEventRecord(ev, stream_));
    const uint64_t seq = ++seq_;
    recorded_.emplace(seq, ev);
    if (item_sink_) {
      while (!positions_.empty() && positions_.front().first <= completed_) positions_.pop_front();
      positions_.emplace_back(seq, launched_);
    }
    return Event{this, seq};
  }

  void wait(const Event& e) override {
    if (!e.valid() || e.stream == this) return;  // own stream: already in order
    if (auto* other = dynamic_cast<CudaStream*>(e.stream)) {
      const uint64_t waited_seq = other->enqueue_wait(e.seq, stream_);
      std::lock_guard<std::mutex> lk(mu_);
      const uint64_t seq = ++launched_;
      if (item_sink_)
        waits_.push_back(
            TraceRecord{OpRecord{"wait", id(), 0, 0, -1}, seq, other->id(), now_ns(), waited_seq});
      return;
    }
    // A stream of another backend (CPU, null): wait for it on the host.
    while (!e.stream->done(e)) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

  // Retires only what was recorded before the wait began: an event another thread records
  // meanwhile may be behind work the wait did not cover.
  void synchronize() override {
    uint64_t recorded_before;
    {
      std::lock_guard<std::mutex> lk(mu_);
      recorded_before = seq_;
    }
    REMAT_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<TraceRecord> records;
    TraceSink* sink;
    ItemTraceSink* item_sink;
    Timing timing;
    uint32_t cupti_stream;
    {
      std::lock_guard<std::mutex> lk(mu_);
      completed_ = std::max(completed_, recorded_before);
      while (!recorded_.empty() && recorded_.begin()->first <= completed_) {
        pool_.push_back(recorded_.begin()->second);
        recorded_.erase(recorded_.begin());
      }
      while (!positions_.empty() && positions_.front().first <= completed_) positions_.pop_front();
      sink = sink_;
      item_sink = item_sink_;
      timing = timing_;
      cupti_stream = cupti_stream_;
      flush_event_trace_locked(&records);
      records.insert(records.end(), waits_.begin(), waits_.end());
      waits_.clear();
    }
    if (timing == Timing::kCupti) {
      collect_cupti(cupti_stream, &records);
      std::lock_guard<std::mutex> lk(mu_);
      ++collects_;
      release_tags_locked(collects_ >= kTagCollects ? collects_ - kTagCollects : 0);
    }
    deliver(sink, item_sink, records);
  }

  bool done(const Event& e) const override {
    if (!e.valid()) return true;
    if (e.stream != this) return e.stream->done(e);
    std::lock_guard<std::mutex> lk(mu_);
    if (e.seq <= completed_) return true;
    const auto it = recorded_.lower_bound(e.seq);
    if (it == recorded_.end()) return false;  // not recorded yet: cannot be complete
    const cudaError_t st = cudaEventQuery(it->second);
    if (st == cudaErrorNotReady) return false;
    REMAT_CUDA_CHECK(st);
    recycle_locked();  // in-order stream: everything up to e.seq is complete too
    return true;
  }

  void* native() override { return stream_; }

  // Call with the stream synchronized (runtime/stream.h). Attaching starts CUPTI tracing or,
  // where CUPTI cannot be used, records an anchor event that maps event time onto the host
  // steady clock. Detaching hands the old sink the CUPTI records that arrived after the last
  // synchronize() and the waits issued since (ItemTraceSink); event-timed ops launched since
  // then are dropped.
  void set_trace_sink(TraceSink* sink) override {
    TraceSink* old_sink;
    ItemTraceSink* old_item_sink;
    Timing old_timing;
    uint32_t old_cupti_stream;
    std::vector<TraceRecord> late;  // waits since the last synchronize(), late CUPTI records
    {
      std::lock_guard<std::mutex> lk(mu_);
      drop_event_trace_locked();
      old_sink = sink_;
      old_item_sink = item_sink_;
      old_timing = timing_;
      old_cupti_stream = cupti_stream_;
      sink_ = nullptr;
      item_sink_ = nullptr;
      timing_ = Timing::kNone;
      late.swap(waits_);
      positions_.clear();
    }
    if (old_timing == Timing::kCupti) {
      auto release = [&] {
        cupti_trace_detach(old_cupti_stream);  // no record of this stream can come any more
        std::lock_guard<std::mutex> lk(mu_);
        release_tags_locked(UINT64_MAX);
      };
      try {
        collect_cupti(old_cupti_stream, &late);
      } catch (...) {
        release();
        throw;
      }
      release();
    }
    deliver(old_sink, old_item_sink, late);
    if (sink == nullptr) return;
    uint32_t cupti_stream = 0;
    const bool cupti = cupti_trace_attach(stream_, &cupti_stream);
    std::lock_guard<std::mutex> lk(mu_);
    sink_ = sink;
    item_sink_ = dynamic_cast<ItemTraceSink*>(sink);
    if (cupti) {
      cupti_stream_ = cupti_stream;
      timing_ = Timing::kCupti;
      return;
    }
    timing_ = Timing::kEvents;
    if (!anchor_) REMAT_CUDA_CHECK(cudaEventCreate(&anchor_));
    REMAT_CUDA_CHECK(cudaEventRecord(anchor_, stream_));
    REMAT_CUDA_CHECK(cudaEventSynchronize(anchor_));
    anchor_ns_ = now_ns();
  }

 private:
  // One traced op awaiting its timestamps.
  struct Pending {
    const char* label;  // static string from launch()
    int block;          // transformer block, -1 when none
    cudaEvent_t start;  // timing events bracketing the op on stream_
    cudaEvent_t end;
    uint64_t seq;       // the op's position in the launch order
    int64_t launch_ns;  // host time of its launch()
  };

  // Enqueues on `waiter` a wait for this stream's event `seq`. Returns the event's position
  // in this stream's launch order (the launched_ count when record() returned it) while an
  // ItemTraceSink is attached; 0 otherwise, or when the event was already known complete
  // (then the wait cannot hold the waiter back).
  uint64_t enqueue_wait(uint64_t seq, cudaStream_t waiter) {
    std::lock_guard<std::mutex> lk(mu_);
    REMAT_CHECK(seq <= seq_, "stream '" + name() + "': wait on an event never recorded");
    if (seq <= completed_) return 0;
    const auto it = recorded_.lower_bound(seq);
    if (it == recorded_.end()) return 0;  // recycled: complete
    REMAT_CUDA_CHECK(cudaStreamWaitEvent(waiter, it->second, 0));
    const auto pos = std::lower_bound(
        positions_.begin(), positions_.end(), seq,
        [](const std::pair<uint64_t, uint64_t>& p, uint64_t s) { return p.first < s; });
    return pos != positions_.end() && pos->first == seq ? pos->second : 0;
  }

  // Hands records to the sink: all of them to an ItemTraceSink, the ops' OpRecords to a plain
  // one. Call without mu_ held.
  static void deliver(TraceSink* sink, ItemTraceSink* item_sink,
                      const std::vector<TraceRecord>& records) {
    if (item_sink) {
      for (const TraceRecord& r : records) item_sink->on_item(r);
    } else if (sink) {
      for (const TraceRecord& r : records)
        if (!r.is_wait()) sink->on_op(r.op);
    }
  }

  // Drops the op_tags() keys of ops launched at collects_ <= `up_to`.
  void release_tags_locked(uint64_t up_to) {
    std::vector<int> keys;
    while (!tag_keys_.empty() && tag_keys_.front().second <= up_to) {
      keys.push_back(tag_keys_.front().first);
      tag_keys_.pop_front();
    }
    if (!keys.empty()) op_tags().erase(keys);
  }

  // Returns the events of completed work to the pool, oldest first, and advances completed_.
  void recycle_locked() const {
    while (!recorded_.empty()) {
      const auto it = recorded_.begin();
      const cudaError_t st = cudaEventQuery(it->second);
      if (st == cudaErrorNotReady) return;
      REMAT_CUDA_CHECK(st);
      completed_ = it->first;
      pool_.push_back(it->second);
      recorded_.erase(it);
    }
  }

  cudaEvent_t take_timing_event_locked() {
    if (!timing_pool_.empty()) {
      cudaEvent_t ev = timing_pool_.back();
      timing_pool_.pop_back();
      return ev;
    }
    cudaEvent_t ev;
    REMAT_CUDA_CHECK(cudaEventCreate(&ev));
    return ev;
  }

  // Appends the CUPTI records that have arrived for this stream (CUPTI id `cupti_stream`),
  // oldest first, each with its op's block, seq and launch time from op_tags(). Work another
  // stream's op enqueued here has that op's block but seq and launch_ns 0 (it has no place in
  // this stream's launch order).
  void collect_cupti(uint32_t cupti_stream, std::vector<TraceRecord>* out) {
    std::vector<CuptiRecord> got;
    cupti_trace_collect(cupti_stream, &got);
    std::sort(got.begin(), got.end(),
              [](const CuptiRecord& a, const CuptiRecord& b) { return a.start_ns < b.start_ns; });
    for (const CuptiRecord& r : got) {
      TraceRecord t{OpRecord{r.label, id(), r.start_ns, r.end_ns, -1}};
      OpTag tag;
      if (op_tags().find(r.tag, &tag)) {
        t.op.block = tag.block;
        if (tag.stream == this) {
          t.seq = tag.seq;
          t.launch_ns = tag.launch_ns;
        }
      }
      out->push_back(t);
    }
  }

  // Turns finished event-timed ops into records; ops whose end event has not completed yet
  // (launched by another thread during a synchronize()) stay for a later flush.
  void flush_event_trace_locked(std::vector<TraceRecord>* out) {
    std::vector<Pending> unfinished;
    for (const Pending& p : pending_) {
      const cudaError_t st = cudaEventQuery(p.end);
      if (st == cudaErrorNotReady) {
        unfinished.push_back(p);
        continue;
      }
      REMAT_CUDA_CHECK(st);
      float start_ms = 0.f, end_ms = 0.f;
      REMAT_CUDA_CHECK(cudaEventElapsedTime(&start_ms, anchor_, p.start));
      REMAT_CUDA_CHECK(cudaEventElapsedTime(&end_ms, anchor_, p.end));
      const OpRecord r{p.label, id(), anchor_ns_ + static_cast<int64_t>(start_ms * 1e6),
                       anchor_ns_ + static_cast<int64_t>(end_ms * 1e6), p.block};
      out->push_back(TraceRecord{r, p.seq, -1, p.launch_ns});
      timing_pool_.push_back(p.start);
      timing_pool_.push_back(p.end);
    }
    pending_.swap(unfinished);
  }

  // Forgets the event-timed ops not flushed yet (a detaching sink drops them).
  void drop_event_trace_locked() {
    for (const Pending& p : pending_) {
      timing_pool_.push_back(p.start);
      timing_pool_.push_back(p.end);
    }
    pending_.clear();
  }

  cudaStream_t stream_ = nullptr;
  mutable std::mutex mu_;
  uint64_t seq_ = 0;                                  // last seq handed out by record()
  mutable uint64_t completed_ = 0;                    // every seq <= this is complete
  mutable std::map<uint64_t, cudaEvent_t> recorded_;  // seq -> event, not yet known complete
  mutable std::vector<cudaEvent_t> pool_;             // idle events (timing disabled)
  // How ops are timed while a sink is attached (kNone exactly when sink_ is null).
  enum class Timing { kNone, kEvents, kCupti };
  TraceSink* sink_ = nullptr;
  ItemTraceSink* item_sink_ = nullptr;  // sink_ when it is an ItemTraceSink, else nullptr
  Timing timing_ = Timing::kNone;
  // Launch order: launch() calls and waits on other CUDA streams' events, counted always.
  uint64_t launched_ = 0;
  // While item_sink_: (record() seq, launched_ when it was recorded), seq ascending, events
  // not known complete only.
  std::deque<std::pair<uint64_t, uint64_t>> positions_;
  std::vector<TraceRecord> waits_;  // unresolved wait records since the last delivery
  uint64_t collects_ = 0;           // CUPTI collects done by synchronize()
  std::deque<std::pair<int, uint64_t>> tag_keys_;  // op_tags() keys, with collects_ at launch
  uint32_t cupti_stream_ = 0;                      // CUPTI's id of stream_ (kCupti)
  std::vector<Pending> pending_;                   // event-timed ops since the last flush
  std::vector<cudaEvent_t> timing_pool_;           // idle timing events
  cudaEvent_t anchor_ = nullptr;                   // recorded when the sink was attached
  int64_t anchor_ns_ = 0;                          // host time of anchor_
};

}  // namespace

std::unique_ptr<Stream> make_cuda_stream(const std::string& name, int id, int priority) {
  return std::make_unique<CudaStream>(name, id, priority);
}

}  // namespace remat
