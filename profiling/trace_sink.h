// A richer trace sink for CPU streams: every work item, cross-stream waits included, with its
// place in the stream's order.
//
// runtime/stream.h's TraceSink gets one OpRecord per op. A sink that also derives from
// ItemTraceSink gets on_item() instead, for every op that ran AND for every cross-stream wait
// (label "wait"), each with its sequence number; CPU streams detect it when it is attached
// (dynamic_cast in set_trace_sink) so plain TraceSinks keep their op-only contract. Streams
// that know nothing of items (CUDA: ops come from timing events, waits happen on the device)
// call on_op(), which forwards with seq = 0 and no waited stream.
#pragma once
#include <cstdint>

#include "runtime/stream.h"

namespace remat {

struct TraceRecord {
  OpRecord op;       // a wait: label "wait", block -1, [start, end] = [began waiting, event done]
  uint64_t seq = 0;  // 1-based position of the item in its stream's launch order (the
                     // Event::seq recorded right after it); 0 = unknown
  int waited_stream = -1;  // a wait: Stream::id() of the stream whose event it waited for;
                           // -1 for an op
  int64_t launch_ns = 0;   // host steady clock when the item was launched; 0 = unknown
  bool is_wait() const { return waited_stream >= 0; }
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
