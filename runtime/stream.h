// Streams and events: the runtime's only notion of concurrency.
//
// A Stream runs the work launched on it in launch order. An Event is a point in one stream's
// order; Stream::wait(e) makes all later work on the waiting stream start only after the
// work before e has finished. On the CPU backend a stream is a worker thread draining a
// queue; on CUDA it is a cudaStream_t and launch() runs the callable on the host at once
// (the callable itself enqueues kernels onto native()).
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

namespace remat {

class Stream;

// A point in a stream's order: everything launched on `stream` before record() returned.
// A default Event is "already complete": waiting on it is a no-op.
struct Event {
  Stream* stream = nullptr;
  uint64_t seq = 0;  // 1-based count of work items recorded before this point
  bool valid() const { return stream != nullptr && seq > 0; }
};

// Receives one record per op when a tracer is attached (profiling/). With no sink
// attached the stream does no tracing work at all.
struct OpRecord {
  const char* label;  // static string naming the op ("fwd.qkv", "recompute.ln1", ...)
  int stream_id;      // Stream::id() of the stream that ran it
  int64_t start_ns;   // steady-clock (CPU) or CUPTI timestamps, ns
  int64_t end_ns;
  int block;  // transformer block the op belongs to, -1 when none
};
class TraceSink {
 public:
  virtual ~TraceSink() = default;
  virtual void on_op(const OpRecord& r) = 0;  // may be called from any worker thread
};

class Stream {
 public:
  virtual ~Stream() = default;

  // Runs fn after all work launched earlier on this stream (CPU: on the worker thread;
  // CUDA: on the calling host thread right away, fn enqueues onto native()).
  // `label` must be a string with static storage duration; `block` is for the trace only.
  virtual void launch(std::function<void()> fn, const char* label, int block = -1) = 0;

  // The point after everything launched so far.
  virtual Event record() = 0;

  // All later work on this stream starts after e (an event of any stream) has completed.
  virtual void wait(const Event& e) = 0;

  // Host blocks until everything launched so far has run. Rethrows the first exception an
  // op threw on this stream (CPU), then clears it.
  virtual void synchronize() = 0;

  // True when the work before e has completed (host-side query, never blocks).
  virtual bool done(const Event& e) const = 0;

  // cudaStream_t on the CUDA backend, nullptr on the CPU backend.
  virtual void* native() { return nullptr; }

  // Attach or detach (nullptr) a trace sink. Not thread-safe against in-flight work:
  // call it with the stream synchronized.
  virtual void set_trace_sink(TraceSink* sink) = 0;

  const std::string& name() const { return name_; }
  int id() const { return id_; }

 protected:
  Stream(std::string name, int id) : name_(std::move(name)), id_(id) {}

 private:
  std::string name_;
  int id_;
};

// Nanoseconds on the steady clock: the time base of every OpRecord and trace sample.
int64_t steady_now_ns();

// A CPU stream: one named worker thread (visible as `name` in debuggers and profilers).
std::unique_ptr<Stream> make_cpu_stream(const std::string& name, int id);

// A stream that runs nothing: launch() drops the work, events are complete at once.
// The dry-run planner drives the real schedule through it.
std::unique_ptr<Stream> make_null_stream(const std::string& name, int id);

}  // namespace remat
