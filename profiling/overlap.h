// Exact interval arithmetic over trace timestamps, and the recompute overlap report.
#pragma once
#include <array>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "profiling/tracer.h"
#include "runtime/arena.h"

namespace remat {

// The half-open interval [begin, end) in ns; empty when end <= begin.
struct Interval {
  int64_t begin = 0;
  int64_t end = 0;
};
using IntervalSet = std::vector<Interval>;  // stands for the union of its intervals

// The same union as sorted, disjoint, non-touching, non-empty intervals.
IntervalSet normalize(IntervalSet s);
// Length of the union of s (overlaps counted once; empty intervals count 0).
int64_t union_length(const IntervalSet& s);
// The intersection of the unions of a and b, normalized.
IntervalSet intersect(const IntervalSet& a, const IntervalSet& b);
// Length of the intersection of the unions of a and b.
int64_t intersection_length(const IntervalSet& a, const IntervalSet& b);

// Recompute time of one block and how much of it was hidden or exposed.
struct BlockOverlap {
  int block = -1;
  double recompute_ms = 0;   // |R_b|: the block's "recompute." ops on the side stream
  double overlapped_ms = 0;  // |R_b ∩ M_ops|
  double exposed_ms = 0;     // main-stream waits on the side stream attributed to block b
};

// What the side stream's recompute cost the main stream. Definitions, with
//   W      the traced window: the union of the host spans labelled "step" when there are
//          any, else [earliest start, latest end] of the main and side streams' records;
//   M_ops  the main stream's op intervals (waits excluded);
//   M_wait the main stream's wait intervals (any waited stream);
//   S_ops  the side stream's op intervals;
//   R      the side stream's ops whose label starts with "recompute.":
// every duration below is an exact union/intersection length of those sets (ns), in ms.
struct OverlapReport {
  std::string main_stream, side_stream;  // stream names
  int steps = 0;                         // host spans labelled "step"
  double step_ms = 0;                    // mean length of those spans; 0 without any
  double window_ms = 0;                  // |W|
  double main_busy_ms = 0;               // |M_ops ∩ W|
  double main_wait_ms = 0;               // |M_wait ∩ W|
  // |W| - |(M_ops ∪ M_wait) ∩ W|: the main stream had nothing to run (host work such as
  // the optimizer and the gradient norm, launch gaps). busy + wait + idle = window.
  double main_idle_ms = 0;
  double side_busy_ms = 0;               // |S_ops ∩ W|
  double recompute_ms = 0;               // |R|
  double recompute_overlapped_ms = 0;    // |R ∩ M_ops|: ran while the main stream worked
  double recompute_hidden_fraction = 0;  // overlapped / recompute; 0 without recompute
  // Sum of the main stream's waits on the side stream (the ready events before a block's
  // backward, and arena reuse of memory the side stream freed): time the main stream stood
  // still because recompute was not done. Waits on one stream never overlap, so the sum is
  // also the union.
  double exposed_recompute_ms = 0;
  int exposed_waits = 0;  // how many such waits
  // The part of exposed_recompute_ms not attributed to a block in `blocks`: waits that held
  // back an op of no block with recompute (e.g. the classifier waiting for arena bytes the
  // side stream freed). A wait belongs to the block of the next op on its stream.
  double exposed_outside_blocks_ms = 0;
  uint64_t arena_live_peak = 0;       // max of the memory curve (execution order, TraceData)
  uint64_t activation_live_peak = 0;  // max of its activation part
  // From the arena's own statistics (host program order, TraceData): the high-water of live
  // bytes, and of activations during each phase's allocations.
  uint64_t arena_peak_bytes = 0;
  std::array<uint64_t, kNumPhases> activation_peak_in_phase{};
  std::vector<BlockOverlap> blocks;  // blocks with recompute, ascending
  // Further streams beside the main stream (the offload copy stream, a communication
  // stream), each with L its op intervals: busy |L ∩ W|, overlapped |L ∩ M_ops|, hidden
  // overlapped / busy, and exposed: the main stream's waits on it (count and sum).
  struct Lane {
    std::string stream;
    double busy_ms = 0, overlapped_ms = 0, hidden_fraction = 0, exposed_ms = 0;
    int exposed_waits = 0;
  };
  std::vector<Lane> lanes;
};

// The report of a trace for the main stream `main_id` and the side stream `side_id`, with a
// lane for each of `lane_ids` (streams absent from the trace give empty lanes).
OverlapReport overlap_report(const TraceData& d, int main_id, int side_id,
                             const std::vector<int>& lane_ids = {});
// One JSON object with the fields above (names as in the struct).
std::string to_json(const OverlapReport& r);
// A few human-readable lines.
void print(const OverlapReport& r, std::FILE* out);

}  // namespace remat
