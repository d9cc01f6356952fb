// CPU streams (one worker thread each) and the null stream used by the dry run.
//
// CPU stream contract, beyond runtime/stream.h:
// - Every launch() and every wait() on another stream's valid event is one work item; an
//   Event's seq is the number of items launched on its stream before record(). The event is
//   complete once the worker has finished that many items, so record() enqueues nothing.
// - All queue state, the completed-item counter and the error live under one mutex. A
//   cross-stream wait blocks the waiting worker on the other stream's mutex/condvar until
//   its completed counter reaches the event's seq, which is the happens-before edge
//   ThreadSanitizer needs between the producer's op and the consumer's op.
// - Errors are sticky until synchronize(): after an op throws, the stream remembers the first
//   exception and SKIPS later ops (they would read the failed op's garbage), but still
//   honours its waits and still counts skipped items as completed, so events recorded on it
//   complete and no other stream deadlocks. synchronize() rethrows and clears the error; ops
//   launched after that run again.
// - A stream must outlive every other stream's pending wait on one of its events.
// - Profiling: the worker names its thread for NVTX and opens an NVTX range named by the
//   label around each op (and one named "wait" around each cross-stream wait); those are
//   no-ops unless a profiler is attached. With a trace sink attached the worker reads the
//   steady clock around each op and reports it; an ItemTraceSink (runtime/trace_sink.h)
//   also gets each cross-stream wait, timed from when the worker began waiting to when the
//   event was complete, and each item's host launch time (read in launch()/wait() while a
//   sink is attached). With no sink attached no clock is read.
#include "runtime/stream.h"

#include <pthread.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

#include "kernels/common.h"
#include "runtime/nvtx.h"
#include "runtime/trace_sink.h"

namespace remat {

int64_t steady_now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace {

int64_t now_ns() {
  return steady_now_ns();
}

class CpuStream final : public Stream {
 public:
  CpuStream(const std::string& name, int id) : Stream(name, id) {
    worker_ = std::thread([this] { run(); });
  }

  // Drains the queue (every launched item runs or is skipped per the error rule), then
  // joins. An error nobody synchronized for is reported on stderr, since it cannot be thrown.
  ~CpuStream() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    work_cv_.notify_one();
    worker_.join();
    if (error_) {
      try {
        std::rethrow_exception(error_);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "remat: stream '%s' destroyed with an unreported error: %s\n",
                     name().c_str(), e.what());
      } catch (...) {
        std::fprintf(stderr, "remat: stream '%s' destroyed with an unreported error\n",
                     name().c_str());
      }
    }
  }

  void launch(std::function<void()> fn, const char* label, int block) override {
    push(Item{std::move(fn), nullptr, 0, label ? label : "", block});
  }

  Event record() override {
    std::lock_guard<std::mutex> lk(mu_);
    return Event{this, launched_};
  }

  void wait(const Event& e) override {
    if (!e.valid() || e.stream == this) return;  // own stream: already in order
    push(Item{nullptr, e.stream, e.seq, "wait", -1});
  }

  void synchronize() override {
    std::exception_ptr err;
    {
      std::unique_lock<std::mutex> lk(mu_);
      const uint64_t target = launched_;
      done_cv_.wait(lk, [&] { return completed_ >= target; });
      err = std::exchange(error_, nullptr);
    }
    if (err) std::rethrow_exception(err);
  }

  bool done(const Event& e) const override {
    if (!e.valid()) return true;
    if (e.stream != this) return e.stream->done(e);
    std::lock_guard<std::mutex> lk(mu_);
    return completed_ >= e.seq;
  }

  void set_trace_sink(TraceSink* sink) override {
    std::lock_guard<std::mutex> lk(mu_);
    sink_ = sink;
    item_sink_ = dynamic_cast<ItemTraceSink*>(sink);
  }

 private:
  // One queue entry: an op (fn set) or a wait on another stream (wait_stream set).
  struct Item {
    std::function<void()> fn;
    Stream* wait_stream;
    uint64_t wait_seq;
    const char* label;
    int block;
    int64_t launch_ns = 0;  // host clock at launch, read only while a sink is attached
  };

  void push(Item item) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (sink_) item.launch_ns = now_ns();
      queue_.push_back(std::move(item));
      ++launched_;
    }
    work_cv_.notify_one();
  }

  // Blocks the calling thread (another stream's worker) until this stream completed `seq`.
  void wait_completed(uint64_t seq) {
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return completed_ >= seq; });
  }

  static void wait_on(Stream* other, uint64_t seq) {
    if (auto* cpu = dynamic_cast<CpuStream*>(other)) {
      cpu->wait_completed(seq);
      return;
    }
    // Another kind of stream (null: always done): poll its host-side query.
    const Event e{other, seq};
    while (!other->done(e)) std::this_thread::sleep_for(std::chrono::microseconds(50));
  }

  void run() {
#ifdef __linux__
    // Linux limits thread names to 15 characters plus the terminator.
    pthread_setname_np(pthread_self(), name().substr(0, 15).c_str());
#endif
    nvtx_name_thread(name().c_str());
    for (;;) {
      Item item;
      TraceSink* sink;
      ItemTraceSink* item_sink;
      uint64_t seq;  // this item's 1-based position in the launch order
      bool skip;
      {
        std::unique_lock<std::mutex> lk(mu_);
        work_cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stop_ and drained
        item = std::move(queue_.front());
        queue_.pop_front();
        sink = sink_;
        item_sink = item_sink_;
        seq = completed_ + 1;
        skip = error_ != nullptr;
      }
      std::exception_ptr err;
      if (item.wait_stream) {
        NvtxRange range("wait");
        if (item_sink) {
          const int64_t start = now_ns();
          wait_on(item.wait_stream, item.wait_seq);
          const int64_t end = now_ns();
          item_sink->on_item(TraceRecord{OpRecord{"wait", id(), start, end, -1}, seq,
                                         item.wait_stream->id(), item.launch_ns});
        } else {
          wait_on(item.wait_stream, item.wait_seq);
        }
      } else if (!skip) {
        try {
          NvtxRange range(item.label, item.block);
          if (sink) {
            const int64_t start = now_ns();
            item.fn();
            const int64_t end = now_ns();
            const OpRecord r{item.label, id(), start, end, item.block};
            if (item_sink)
              item_sink->on_item(TraceRecord{r, seq, -1, item.launch_ns});
            else
              sink->on_op(r);
          } else {
            item.fn();
          }
        } catch (...) {
          err = std::current_exception();
        }
      }
      {
        std::lock_guard<std::mutex> lk(mu_);
        ++completed_;
        if (err && !error_) error_ = err;
      }
      done_cv_.notify_all();
    }
  }

  mutable std::mutex mu_;
  std::condition_variable work_cv_;  // worker: queue non-empty or stop
  std::condition_variable done_cv_;  // host and other workers: completed_ advanced
  std::deque<Item> queue_;
  uint64_t launched_ = 0;   // items pushed (ops and waits)
  uint64_t completed_ = 0;  // items finished or skipped, in order
  bool stop_ = false;
  std::exception_ptr error_;  // first exception since the last synchronize()
  TraceSink* sink_ = nullptr;
  ItemTraceSink* item_sink_ = nullptr;  // sink_ when it is an ItemTraceSink, else nullptr
  std::thread worker_;  // last member: started after everything above is constructed
};

// Runs nothing. Each launch() and record() advances a counter, so events are valid and
// increasing (the dry run's events look like the real run's) and all complete at once.
class NullStream final : public Stream {
 public:
  NullStream(const std::string& name, int id) : Stream(name, id) {}
  void launch(std::function<void()>, const char*, int) override { ++seq_; }
  Event record() override { return Event{this, ++seq_}; }
  void wait(const Event&) override {}
  void synchronize() override {}
  bool done(const Event&) const override { return true; }
  void set_trace_sink(TraceSink*) override {}

 private:
  uint64_t seq_ = 0;
};

}  // namespace

std::unique_ptr<Stream> make_cpu_stream(const std::string& name, int id) {
  return std::make_unique<CpuStream>(name, id);
}

std::unique_ptr<Stream> make_null_stream(const std::string& name, int id) {
  return std::make_unique<NullStream>(name, id);
}

}  // namespace remat
