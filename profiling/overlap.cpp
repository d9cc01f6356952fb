#include "profiling/overlap.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>

#include "runtime/plan.h"

namespace remat {

IntervalSet normalize(IntervalSet s) {
  s.erase(std::remove_if(s.begin(), s.end(), [](const Interval& i) { return i.end <= i.begin; }),
          s.end());
  std::sort(s.begin(), s.end(),
            [](const Interval& a, const Interval& b) { return a.begin < b.begin; });
  IntervalSet out;
  for (const Interval& i : s) {
    if (!out.empty() && i.begin <= out.back().end)  // overlapping or touching: merge
      out.back().end = std::max(out.back().end, i.end);
    else
      out.push_back(i);
  }
  return out;
}

int64_t union_length(const IntervalSet& s) {
  int64_t n = 0;
  for (const Interval& i : normalize(s)) n += i.end - i.begin;
  return n;
}

IntervalSet intersect(const IntervalSet& a, const IntervalSet& b) {
  const IntervalSet x = normalize(a), y = normalize(b);
  IntervalSet out;
  size_t i = 0, j = 0;
  while (i < x.size() && j < y.size()) {
    const int64_t lo = std::max(x[i].begin, y[j].begin);
    const int64_t hi = std::min(x[i].end, y[j].end);
    if (lo < hi) out.push_back({lo, hi});
    // Advance whichever ends first; it cannot meet anything later in the other set.
    if (x[i].end < y[j].end)
      i++;
    else
      j++;
  }
  return normalize(out);
}

int64_t intersection_length(const IntervalSet& a, const IntervalSet& b) {
  return union_length(intersect(a, b));
}

namespace {

double ms(int64_t ns) {
  return static_cast<double>(ns) / 1e6;
}

Interval span_of(const TraceRecord& r) {
  return {r.op.start_ns, r.op.end_ns};
}

// The report keeps six decimals: ms to the ns.
double num(double x) {
  char b[64];
  std::snprintf(b, sizeof b, "%.6f", x);
  return std::strtod(b, nullptr);
}

}  // namespace

OverlapReport overlap_report(const TraceData& d, int main_id, int side_id,
                             const std::vector<int>& lane_ids) {
  OverlapReport r;
  auto name_of = [&](int id) {
    auto it = d.stream_names.find(id);
    return it == d.stream_names.end() ? "stream " + std::to_string(id) : it->second;
  };
  r.main_stream = name_of(main_id);
  r.side_stream = name_of(side_id);

  IntervalSet m_ops, m_wait, s_ops, rc, hull_of;
  std::map<int, IntervalSet> rc_block;
  std::map<int, int64_t> exposed_block;
  int64_t exposed = 0;
  for (const TraceRecord& t : d.records) {
    const int sid = t.op.stream_id;
    if (sid != main_id && sid != side_id) continue;
    hull_of.push_back(span_of(t));
    if (sid == main_id) {
      if (!t.is_wait()) {
        m_ops.push_back(span_of(t));
      } else {
        m_wait.push_back(span_of(t));
        if (t.waited_stream == side_id) {
          exposed += t.op.end_ns - t.op.start_ns;
          r.exposed_waits++;
          exposed_block[t.op.block] += t.op.end_ns - t.op.start_ns;
        }
      }
    } else if (!t.is_wait()) {
      s_ops.push_back(span_of(t));
      if (trace_category(t.op.label) == TraceCategory::kRecompute) {
        rc.push_back(span_of(t));
        rc_block[t.op.block].push_back(span_of(t));
      }
    }
  }

  IntervalSet window;
  int64_t step_sum = 0;
  for (const HostSpan& s : d.spans) {
    if (!s.label || std::strcmp(s.label, "step") != 0) continue;
    window.push_back({s.start_ns, s.end_ns});
    step_sum += s.end_ns - s.start_ns;
    r.steps++;
  }
  if (window.empty() && !hull_of.empty()) {
    const IntervalSet h = normalize(hull_of);
    window.push_back({h.front().begin, h.back().end});
  }
  window = normalize(window);

  r.step_ms = r.steps ? ms(step_sum) / r.steps : 0.0;
  for (int id : lane_ids) {
    OverlapReport::Lane lane;
    lane.stream = name_of(id);
    IntervalSet ops;
    int64_t exposed_ns = 0;
    for (const TraceRecord& t : d.records) {
      if (t.op.stream_id == id && !t.is_wait()) ops.push_back(span_of(t));
      if (t.op.stream_id == main_id && t.is_wait() && t.waited_stream == id) {
        exposed_ns += t.op.end_ns - t.op.start_ns;
        lane.exposed_waits++;
      }
    }
    lane.busy_ms = ms(intersection_length(ops, window));
    lane.overlapped_ms = ms(intersection_length(intersect(ops, window), m_ops));
    lane.hidden_fraction = lane.busy_ms > 0 ? lane.overlapped_ms / lane.busy_ms : 0.0;
    lane.exposed_ms = ms(exposed_ns);
    r.lanes.push_back(lane);
  }
  r.window_ms = ms(union_length(window));
  r.main_busy_ms = ms(intersection_length(m_ops, window));
  r.main_wait_ms = ms(intersection_length(m_wait, window));
  IntervalSet m_any = m_ops;
  m_any.insert(m_any.end(), m_wait.begin(), m_wait.end());
  r.main_idle_ms = ms(union_length(window) - intersection_length(m_any, window));
  r.side_busy_ms = ms(intersection_length(s_ops, window));
  const int64_t rc_len = union_length(rc);
  r.recompute_ms = ms(rc_len);
  const int64_t hidden = intersection_length(rc, m_ops);
  r.recompute_overlapped_ms = ms(hidden);
  r.recompute_hidden_fraction = rc_len > 0 ? double(hidden) / double(rc_len) : 0.0;
  r.exposed_recompute_ms = ms(exposed);

  for (const MemorySample& m : d.memory) {
    r.arena_live_peak = std::max(r.arena_live_peak, m.live_bytes);
    r.activation_live_peak = std::max(r.activation_live_peak, m.activation_bytes);
  }
  r.arena_peak_bytes = d.arena_peak_bytes;
  for (int p = 0; p < kNumPhases; p++)
    r.activation_peak_in_phase[p] = d.activation_peak_in_phase[p];

  for (const auto& [block, len] : exposed_block)
    if (rc_block.count(block) == 0) r.exposed_outside_blocks_ms += ms(len);
  for (const auto& [block, set] : rc_block) {
    BlockOverlap b;
    b.block = block;
    b.recompute_ms = ms(union_length(set));
    b.overlapped_ms = ms(intersection_length(set, m_ops));
    auto it = exposed_block.find(block);
    b.exposed_ms = it == exposed_block.end() ? 0.0 : ms(it->second);
    r.blocks.push_back(b);
  }
  return r;
}

std::string to_json(const OverlapReport& r) {
  nlohmann::ordered_json j;
  j["main_stream"] = r.main_stream;
  j["side_stream"] = r.side_stream;
  j["steps"] = r.steps;
  j["step_ms"] = num(r.step_ms);
  j["window_ms"] = num(r.window_ms);
  j["main_busy_ms"] = num(r.main_busy_ms);
  j["main_wait_ms"] = num(r.main_wait_ms);
  j["main_idle_ms"] = num(r.main_idle_ms);
  j["side_busy_ms"] = num(r.side_busy_ms);
  j["recompute_ms"] = num(r.recompute_ms);
  j["recompute_overlapped_ms"] = num(r.recompute_overlapped_ms);
  j["recompute_hidden_fraction"] = num(r.recompute_hidden_fraction);
  j["exposed_recompute_ms"] = num(r.exposed_recompute_ms);
  j["exposed_waits"] = r.exposed_waits;
  j["exposed_outside_blocks_ms"] = num(r.exposed_outside_blocks_ms);
  j["arena_live_peak"] = r.arena_live_peak;
  j["activation_live_peak"] = r.activation_live_peak;
  j["arena_peak_bytes"] = r.arena_peak_bytes;
  nlohmann::ordered_json phases = nlohmann::ordered_json::object();
  for (int p = 0; p < kNumPhases; p++)
    phases[phase_name(static_cast<Phase>(p))] = r.activation_peak_in_phase[p];
  j["activation_peak_in_phase"] = std::move(phases);
  nlohmann::ordered_json blocks = nlohmann::ordered_json::array();
  for (const BlockOverlap& b : r.blocks) {
    blocks.push_back({{"block", b.block},
                      {"recompute_ms", num(b.recompute_ms)},
                      {"overlapped_ms", num(b.overlapped_ms)},
                      {"exposed_ms", num(b.exposed_ms)}});
  }
  j["blocks"] = std::move(blocks);
  nlohmann::ordered_json lanes = nlohmann::ordered_json::array();
  for (const OverlapReport::Lane& l : r.lanes) {
    lanes.push_back({{"stream", l.stream},
                     {"busy_ms", num(l.busy_ms)},
                     {"overlapped_ms", num(l.overlapped_ms)},
                     {"hidden_fraction", num(l.hidden_fraction)},
                     {"exposed_ms", num(l.exposed_ms)},
                     {"exposed_waits", l.exposed_waits}});
  }
  j["lanes"] = std::move(lanes);
  return j.dump(2, ' ', false, nlohmann::ordered_json::error_handler_t::replace) + "\n";
}

void print(const OverlapReport& r, std::FILE* out) {
  const double pct = 100.0 * r.recompute_hidden_fraction;
  std::fprintf(out, "overlap report: main stream '%s', side stream '%s', %d step%s traced\n",
               r.main_stream.c_str(), r.side_stream.c_str(), r.steps, r.steps == 1 ? "" : "s");
  std::fprintf(out, "  step time          %.3f ms (mean), window %.3f ms\n", r.step_ms,
               r.window_ms);
  std::fprintf(out, "  main stream        busy %.3f ms | waiting %.3f ms | idle %.3f ms\n",
               r.main_busy_ms, r.main_wait_ms, r.main_idle_ms);
  std::fprintf(out, "  recompute          %.3f ms on the side stream (busy %.3f ms)\n",
               r.recompute_ms, r.side_busy_ms);
  std::fprintf(out, "  hidden             %.3f ms (%.1f%%) ran while the main stream worked\n",
               r.recompute_overlapped_ms, pct);
  std::fprintf(out,
               "  exposed recompute  %.3f ms (%d waits of the main stream on the side stream)\n",
               r.exposed_recompute_ms, r.exposed_waits);
  if (!r.blocks.empty()) {
    std::fprintf(out, "  per block          recompute / hidden / exposed ms:");
    for (const BlockOverlap& b : r.blocks)
      std::fprintf(out, " [%d] %.1f/%.1f/%.1f", b.block, b.recompute_ms, b.overlapped_ms,
                   b.exposed_ms);
    std::fprintf(out, "; outside blocks %.1f exposed\n", r.exposed_outside_blocks_ms);
  }
  for (const OverlapReport::Lane& l : r.lanes)
    std::fprintf(out,
                 "  stream '%s'  busy %.3f ms, %.3f ms (%.1f%%) under main-stream work, "
                 "exposed %.3f ms (%d waits)\n",
                 l.stream.c_str(), l.busy_ms, l.overlapped_ms, 100.0 * l.hidden_fraction,
                 l.exposed_ms, l.exposed_waits);
  std::fprintf(out, "  activation peak    forward %s | backward %s | recompute %s\n",
               format_bytes(r.activation_peak_in_phase[0]).c_str(),
               format_bytes(r.activation_peak_in_phase[1]).c_str(),
               format_bytes(r.activation_peak_in_phase[2]).c_str());
  std::fprintf(out, "  arena peak         %s (timeline: %s, activations %s)\n",
               format_bytes(r.arena_peak_bytes).c_str(), format_bytes(r.arena_live_peak).c_str(),
               format_bytes(r.activation_live_peak).c_str());
}

}  // namespace remat
