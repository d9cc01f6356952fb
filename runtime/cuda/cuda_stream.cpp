// CudaStream: remat::Stream over a cudaStream_t and pooled cudaEvent_t (contract in
// runtime/cuda/cuda_stream.h).
#include "runtime/cuda/cuda_stream.h"

#include <nvtx3/nvToolsExtCudaRt.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "kernels/cuda_common.cuh"
#include "runtime/cuda/cupti_trace.h"

namespace remat {
namespace {

int64_t now_ns() {
  return steady_now_ns();
}

class CudaStream final : public Stream {
 public:
  CudaStream(const std::string& name, int id, int priority) : Stream(name, id) {
    REMAT_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, priority));
    nvtxNameCudaStreamA(stream_, name.c_str());
  }

  // Waits for the stream's work, then frees everything; records not yet delivered are dropped.
  // Never throws: errors go to stderr.
  ~CudaStream() override {
    const cudaError_t err = cudaStreamSynchronize(stream_);
    if (err != cudaSuccess)
      std::fprintf(stderr, "remat: stream '%s' destroyed with a pending error: %s\n",
                   name().c_str(), cudaGetErrorString(err));
    if (timing_ == Timing::kCupti) cupti_trace_detach(cupti_stream_);
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
    {
      std::lock_guard<std::mutex> lk(mu_);
      timing = timing_;
      cupti_stream = cupti_stream_;
    }
    if (timing == Timing::kNone) {
      fn();
      return;
    }
    if (timing == Timing::kCupti) {
      const CuptiOpScope op(cupti_stream, label ? label : "", block);
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
    pending_.push_back(Pending{label ? label : "", block, start, end});
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
    return Event{this, seq};
  }

  void wait(const Event& e) override {
    if (!e.valid() || e.stream == this) return;  // own stream: already in order
    if (auto* other = dynamic_cast<CudaStream*>(e.stream)) {
      other->enqueue_wait(e.seq, stream_);
      return;
    }
    // A stream of another backend (CPU, null): wait for it on the host.
    while (!e.stream->done(e)) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

  void synchronize() override {
    REMAT_CUDA_CHECK(cudaStreamSynchronize(stream_));
    std::vector<OpRecord> records;
    TraceSink* sink;
    Timing timing;
    uint32_t cupti_stream;
    {
      std::lock_guard<std::mutex> lk(mu_);
      completed_ = seq_;
      for (auto& kv : recorded_) pool_.push_back(kv.second);
      recorded_.clear();
      sink = sink_;
      timing = timing_;
      cupti_stream = cupti_stream_;
      flush_event_trace_locked(&records);
    }
    if (timing == Timing::kCupti) collect_cupti(cupti_stream, &records);
    if (sink)
      for (const OpRecord& r : records) sink->on_op(r);
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
  // synchronize(); event-timed ops launched since then are dropped.
  void set_trace_sink(TraceSink* sink) override {
    TraceSink* old_sink;
    Timing old_timing;
    uint32_t old_cupti_stream;
    {
      std::lock_guard<std::mutex> lk(mu_);
      std::vector<OpRecord> dropped;
      flush_event_trace_locked(&dropped);
      old_sink = sink_;
      old_timing = timing_;
      old_cupti_stream = cupti_stream_;
      sink_ = nullptr;
      timing_ = Timing::kNone;
    }
    if (old_timing == Timing::kCupti) {
      std::vector<OpRecord> late;
      try {
        collect_cupti(old_cupti_stream, &late);
      } catch (...) {
        cupti_trace_detach(old_cupti_stream);
        throw;
      }
      cupti_trace_detach(old_cupti_stream);
      if (old_sink)
        for (const OpRecord& r : late) old_sink->on_op(r);
    }
    if (sink == nullptr) return;
    uint32_t cupti_stream = 0;
    const bool cupti = cupti_trace_attach(stream_, &cupti_stream);
    std::lock_guard<std::mutex> lk(mu_);
    sink_ = sink;
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
  };

  // Enqueues on `waiter` a wait for this stream's event `seq`.
  void enqueue_wait(uint64_t seq, cudaStream_t waiter) {
    std::lock_guard<std::mutex> lk(mu_);
    REMAT_CHECK(seq <= seq_, "stream '" + name() + "': wait on an event never recorded");
    if (seq <= completed_) return;
    const auto it = recorded_.lower_bound(seq);
    if (it == recorded_.end()) return;  // recycled: complete
    REMAT_CUDA_CHECK(cudaStreamWaitEvent(waiter, it->second, 0));
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
  // oldest first.
  void collect_cupti(uint32_t cupti_stream, std::vector<OpRecord>* out) {
    std::vector<CuptiRecord> got;
    cupti_trace_collect(cupti_stream, &got);
    std::sort(got.begin(), got.end(),
              [](const CuptiRecord& a, const CuptiRecord& b) { return a.start_ns < b.start_ns; });
    for (const CuptiRecord& r : got)
      out->push_back(OpRecord{r.label, id(), r.start_ns, r.end_ns, r.block});
  }

  // Turns finished event-timed ops into records (the stream has been synchronized).
  void flush_event_trace_locked(std::vector<OpRecord>* out) {
    for (const Pending& p : pending_) {
      float start_ms = 0.f, end_ms = 0.f;
      REMAT_CUDA_CHECK(cudaEventElapsedTime(&start_ms, anchor_, p.start));
      REMAT_CUDA_CHECK(cudaEventElapsedTime(&end_ms, anchor_, p.end));
      out->push_back(OpRecord{p.label, id(), anchor_ns_ + static_cast<int64_t>(start_ms * 1e6),
                              anchor_ns_ + static_cast<int64_t>(end_ms * 1e6), p.block});
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
  Timing timing_ = Timing::kNone;
  uint32_t cupti_stream_ = 0;             // CUPTI's id of stream_ (kCupti)
  std::vector<Pending> pending_;          // event-timed ops since the last flush
  std::vector<cudaEvent_t> timing_pool_;  // idle timing events
  cudaEvent_t anchor_ = nullptr;          // recorded when the sink was attached
  int64_t anchor_ns_ = 0;                 // host time of anchor_
};

}  // namespace

std::unique_ptr<Stream> make_cuda_stream(const std::string& name, int id, int priority) {
  return std::make_unique<CudaStream>(name, id, priority);
}

}  // namespace remat
