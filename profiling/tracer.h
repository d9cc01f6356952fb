// The in-process tracer: per-stream op and wait records, host spans and the arena's live
// bytes, written as a Chrome trace (opens in Perfetto and chrome://tracing).
//
// Threads: on_item() is called by the streams' worker threads (CPU) or from synchronize()
// (CUDA), any number at once, under one mutex. attach(), attach_arena(), detach(), add_span(),
// note_stats() and the arena hook run on the host thread that drives the streams and the arena.
// data() and the writers may run on any thread once the streams are synchronized.
#pragma once
#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/arena.h"
#include "runtime/trace_sink.h"

namespace remat {

// What an op label names: "fwd.*" forward, "bwd.*" backward, "recompute.*" recompute, "wait",
// "classifier*" classifier, "comm.*" communication (data parallel), anything else other. The
// trace's event category.
enum class TraceCategory { kForward, kBackward, kRecompute, kWait, kClassifier, kComm, kOther };
TraceCategory trace_category(const char* label);
const char* trace_category_name(TraceCategory k);  // "forward", "backward", ... as above

// A host-side interval, e.g. one training step ("step", index = the 1-based step number).
struct HostSpan {
  const char* label;  // static storage
  int64_t start_ns;   // steady clock, like the stream records
  int64_t end_ns;
  int index;  // -1 when none
};

// One point of the arena's memory curve on the stream timeline.
//
// The arena calls its hook in host program order, which runs ahead of the streams. Each
// alloc or free is therefore moved to when it takes effect on the streams: an alloc to the
// start of the first item launched (on any traced stream) after it -- the op it was
// allocated for -- and a free to the end of the last item launched before it -- its last
// user -- but never before the host made the call. (That is how the runtime issues work:
// alloc right before the launch that fills a block, free right after the launch that last
// reads it.) Without such an item (nothing launched since, streams whose records carry no
// launch time) the host time is used. The curve is then the running sum of the changes in
// that time order, starting from the arena's live bytes when attach_arena() was called, so
// its values are live bytes in execution order (its peak may differ from the arena's
// host-order peak_bytes).
struct MemorySample {
  int64_t host_ns = 0;            // steady clock at the hook call (or at attach_arena())
  int64_t ts_ns = 0;              // when the change took effect on the stream timeline
  uint64_t live_bytes = 0;        // all usages, after this change in execution order
  uint64_t activation_bytes = 0;  // Usage::kActivation only, likewise
};

// Unresolved waits (CUDA streams, runtime/trace_sink.h) are given their interval by data():
// a stream that reached a wait stands still until the waited work is done, and the next item
// on it starts no earlier. For a wait w on stream S (seq q, launch_ns L) on stream W up to
// W's position p = w.waited_seq, with every record that has seq > 0 taking part:
//   start = max(L, the latest end of S's items with seq < q -- ops, and waits already resolved
//           or timed, so that waits back to back never overlap);
//   end   = max(start, min(the earliest start of S's ops with seq > q,
//                          the latest end of W's ops with seq <= p)),
//   and end = start when W has no op with seq <= p in the trace (p = 0: unknown) -- the
//   waited work is not in the trace, so nothing says the wait held the stream back.
// The start is no earlier than L because the device cannot wait on a wait not yet enqueued
// (the host may have been late, and then the main stream was idle, not waiting). Waits
// that resolve to zero length are kept (a wait is still counted, as on CPU streams). An op
// with several records (one per kernel, same seq) ends at their latest end and starts at
// their earliest start. With CUPTI the interval is exact up to the CUPTI-to-host clock
// mapping. A record with seq 0 takes no part; an unresolved wait with seq 0 gets
// [launch_ns, launch_ns].

// A snapshot of everything recorded.
struct TraceData {
  std::map<int, std::string> stream_names;  // Stream::id() -> Stream::name()
  // Sorted by (stream id, start, seq), unresolved waits resolved (above). A wait's op.block
  // is filled in with the block of the next op on its stream (the op it held back); -1 when
  // no op follows.
  std::vector<TraceRecord> records;
  std::vector<HostSpan> spans;       // in the order added
  std::vector<MemorySample> memory;  // ts_ns non-decreasing; one per alloc/free and attach
  std::array<uint64_t, kNumPhases> activation_peak_in_phase{};  // max over note_stats()
  uint64_t arena_peak_bytes = 0;                                // max over note_stats()
};

class Tracer final : public ItemTraceSink {
 public:
  Tracer() = default;
  // Detaches (see detach()): the attached streams and arena must still be alive, e.g. by
  // declaring the tracer after what it traces, or must have been detached already.
  ~Tracer() override { detach(); }
  Tracer(const Tracer&) = delete;
  Tracer& operator=(const Tracer&) = delete;

  // Registers s's name under s->id() (its lane) and attaches this tracer as its sink. s must
  // be synchronized (runtime/stream.h). Attaching an attached stream is a no-op.
  void attach(Stream* s);
  // Samples a's live bytes now and after every alloc and free (Arena::set_live_hook),
  // replacing any hook it had; MemorySample says how they are placed in time.
  void attach_arena(Arena* a);
  // Detaches from every attached stream (each must be synchronized) and from the arena.
  // What was recorded stays; attach again to record more.
  void detach();

  // A host interval to show on the "host" lane (and, labelled "step", to define the window).
  void add_span(const char* label, int64_t start_ns, int64_t end_ns, int index = -1);
  // Keeps the elementwise maximum of the activation peaks per phase and of peak_bytes.
  void note_stats(const ArenaStats& s);

  void on_item(const TraceRecord& r) override;

  TraceData data() const;
  // The Chrome trace of data() (see chrome_trace_json).
  void write_chrome_json(const std::string& path) const;

 private:
  struct RawSample {
    int64_t host_ns;
    uint64_t live, activations;
    bool baseline;  // taken by attach_arena(): starts a new running sum
  };
  static void live_hook(void* ctx, size_t live, size_t activations);
  void place_memory(const std::vector<TraceRecord>& records, std::vector<MemorySample>* out) const;

  // Host-thread state.
  std::vector<Stream*> lanes_;  // attached streams, in attach order
  Arena* arena_ = nullptr;

  mutable std::mutex mu_;  // guards everything below
  std::map<int, std::string> names_;
  std::map<int, std::vector<TraceRecord>> records_;  // by stream id, in arrival order
  std::vector<HostSpan> spans_;
  std::vector<RawSample> samples_;
  std::array<uint64_t, kNumPhases> act_peak_{};
  uint64_t arena_peak_ = 0;
};

// The Chrome trace JSON ("traceEvents" format) of d, timestamps in µs from the earliest
// event, exact to the ns:
// - "M" events: process_name "remat"; thread_name and thread_sort_index per stream (tid =
//   stream id) and, with host spans, for the "host" lane (tid kHostLaneTid);
// - "X" events: one per record (name = op label, cat = op_kind_name, args block, op, seq; a
//   wait also has waited_stream (id), waited_stream_name and waited_seq) and one per host
//   span (cat "host", args index);
// - "C" events named "arena bytes" at each sample's ts_ns, args {live, activations}.
constexpr int kHostLaneTid = 1000;
std::string chrome_trace_json(const TraceData& d);

}  // namespace remat
