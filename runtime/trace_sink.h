// A richer trace sink: every work item of a stream, cross-stream waits included, with its
// place in the stream's order.
//
// runtime/stream.h's TraceSink gets one OpRecord per op. A sink that also derives from
// ItemTraceSink gets on_item() instead, for every op that ran AND for every cross-stream wait
// (label "wait"), each with its sequence number and host launch time; streams detect it when
// it is attached (dynamic_cast in set_trace_sink) so plain TraceSinks keep their op-only
// contract. Where the records come from:
// - CPU streams (runtime/stream.cpp): a wait is timed on the worker thread, from when it began
//   waiting to when the event was complete.
// - CUDA streams (runtime/cuda/cuda_stream.cpp): ops are timed on the GPU (one record per
//   kernel with CUPTI, all of an op's records sharing its seq), but a wait happens on the
//   device where nothing times it, so it comes UNRESOLVED: start_ns == end_ns == 0, with
//   waited_seq set. The Tracer resolves it from the records around it (profiling/tracer.h).
// Streams that know nothing of items call on_op(), which forwards with seq = 0 and no waited
// stream.
#pragma once
#include <cstdint>

#include "runtime/stream.h"

namespace remat {

struct TraceRecord {
  OpRecord op;             // a wait: label "wait", block -1, [start, end] = [began waiting, event
                           // done]; [0, 0] = unresolved (a CUDA stream's wait, see above)
  uint64_t seq = 0;        // 1-based position of the item in its stream's launch order (CPU: the
                           // Event::seq recorded right after it); 0 = unknown
  int waited_stream = -1;  // a wait: Stream::id() of the stream whose event it waited for;
                           // -1 for an op
  int64_t launch_ns = 0;   // host steady clock when the item was launched; 0 = unknown
  // A wait: the position in the waited stream's launch order (its items' seq) after which
  // it may proceed; 0 = unknown. Set by CUDA streams; CPU streams leave it 0 (their waits
  // come timed).
  uint64_t waited_seq = 0;
  bool is_wait() const { return waited_stream >= 0; }
  bool is_unresolved_wait() const { return is_wait() && op.start_ns == 0 && op.end_ns == 0; }
};

class ItemTraceSink : public TraceSink {
 public:
  // One call per item that ran (skipped ops after an error are not reported), in the
  // stream's order, from the stream's worker thread; calls from different streams are
  // concurrent.
  virtual void on_item(const TraceRecord& r) = 0;
  void on_op(const OpRecord& r) override { on_item(TraceRecord{r, 0, -1, 0}); }
};

}  // namespace remat
