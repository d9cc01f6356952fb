#include "profiling/tracer.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>

#include "kernels/common.h"

namespace remat {
namespace {

int64_t now_ns() {
  return steady_now_ns();
}

bool starts_with(const char* s, const char* prefix) {
  return std::strncmp(s, prefix, std::strlen(prefix)) == 0;
}

// ns as µs. The double is the one nearest the exact decimal ns / 1000 and nlohmann prints
// text that reads back as that double, so a trace keeps every ns (for spans under 2^52 ns).
double micros(int64_t ns) {
  return static_cast<double>(ns) / 1000.0;
}

// The ops (not waits) of one stream with seq > 0, sorted by seq, with running extremes for
// the wait resolution rule (tracer.h).
struct SeqIndex {
  std::vector<uint64_t> seq;        // ascending; an op with several records appears as often
  std::vector<int64_t> end_upto;    // [i]: the latest end of the ops at [0, i]
  std::vector<int64_t> start_from;  // [i]: the earliest start of the ops at [i, n)

  explicit SeqIndex(const std::vector<TraceRecord>& recs) {
    std::vector<const TraceRecord*> ops;
    for (const TraceRecord& r : recs)
      if (!r.is_wait() && r.seq > 0) ops.push_back(&r);
    std::stable_sort(ops.begin(), ops.end(),
                     [](const TraceRecord* a, const TraceRecord* b) { return a->seq < b->seq; });
    const size_t n = ops.size();
    seq.resize(n);
    end_upto.resize(n);
    start_from.resize(n);
    for (size_t i = 0; i < n; i++) {
      seq[i] = ops[i]->seq;
      end_upto[i] = i ? std::max(end_upto[i - 1], ops[i]->op.end_ns) : ops[i]->op.end_ns;
    }
    for (size_t i = n; i-- > 0;)
      start_from[i] =
          i + 1 < n ? std::min(start_from[i + 1], ops[i]->op.start_ns) : ops[i]->op.start_ns;
  }
  // The latest end of the ops with seq <= p; false when there is none.
  bool end_up_to(uint64_t p, int64_t* out) const {
    const size_t i = std::upper_bound(seq.begin(), seq.end(), p) - seq.begin();
    if (i == 0) return false;
    *out = end_upto[i - 1];
    return true;
  }
  // The earliest start of the ops with seq > q; INT64_MAX when there is none.
  int64_t start_after(uint64_t q) const {
    const size_t i = std::upper_bound(seq.begin(), seq.end(), q) - seq.begin();
    return i < seq.size() ? start_from[i] : INT64_MAX;
  }
};

// Gives every unresolved wait in `by_stream` (stream id -> its records) its interval, by the
// rule in tracer.h.
void resolve_waits(std::map<int, std::vector<TraceRecord>>* by_stream) {
  bool any = false;
  for (const auto& [id, recs] : *by_stream)
    for (const TraceRecord& r : recs) any = any || r.is_unresolved_wait();
  if (!any) return;
  std::map<int, SeqIndex> index;
  for (const auto& [id, recs] : *by_stream) index.emplace(id, SeqIndex(recs));
  for (auto& [id, recs] : *by_stream) {
    // The stream's items in seq order; `cursor` is the latest end of those before.
    std::vector<TraceRecord*> order;
    for (TraceRecord& r : recs) {
      if (r.seq > 0) {
        order.push_back(&r);
      } else if (r.is_unresolved_wait()) {  // no place in the order: no length
        r.op.start_ns = r.op.end_ns = r.launch_ns;
      }
    }
    std::stable_sort(order.begin(), order.end(),
                     [](const TraceRecord* a, const TraceRecord* b) { return a->seq < b->seq; });
    int64_t cursor = INT64_MIN;
    for (TraceRecord* r : order) {
      if (r->is_unresolved_wait()) {
        const int64_t start = std::max(r->launch_ns, cursor);
        int64_t end = start, waited_end;
        const auto w = index.find(r->waited_stream);
        if (r->waited_seq > 0 && w != index.end() &&
            w->second.end_up_to(r->waited_seq, &waited_end))
          end = std::max(start, std::min(index.at(id).start_after(r->seq), waited_end));
        r->op.start_ns = start;
        r->op.end_ns = end;
      }
      cursor = std::max(cursor, r->op.end_ns);
    }
  }
}

}  // namespace

TraceCategory trace_category(const char* label) {
  if (starts_with(label, "fwd.")) return TraceCategory::kForward;
  if (starts_with(label, "bwd.")) return TraceCategory::kBackward;
  if (starts_with(label, "recompute.")) return TraceCategory::kRecompute;
  if (std::strcmp(label, "wait") == 0) return TraceCategory::kWait;
  if (starts_with(label, "classifier")) return TraceCategory::kClassifier;
  if (starts_with(label, "comm.")) return TraceCategory::kComm;
  return TraceCategory::kOther;
}

const char* trace_category_name(TraceCategory k) {
  switch (k) {
    case TraceCategory::kForward:
      return "forward";
    case TraceCategory::kBackward:
      return "backward";
    case TraceCategory::kRecompute:
      return "recompute";
    case TraceCategory::kWait:
      return "wait";
    case TraceCategory::kClassifier:
      return "classifier";
    case TraceCategory::kComm:
      return "communication";
    case TraceCategory::kOther:
      break;
  }
  return "other";
}

void Tracer::attach(Stream* s) {
  REMAT_CHECK(s != nullptr, "tracer: attach of a null stream");
  if (std::find(lanes_.begin(), lanes_.end(), s) != lanes_.end()) return;
  {
    std::lock_guard<std::mutex> lk(mu_);
    names_[s->id()] = s->name();
  }
  lanes_.push_back(s);
  s->set_trace_sink(this);
}

void Tracer::attach_arena(Arena* a) {
  REMAT_CHECK(a != nullptr, "tracer: attach of a null arena");
  arena_ = a;
  const ArenaStats& s = a->stats();
  {
    std::lock_guard<std::mutex> lk(mu_);
    samples_.push_back(RawSample{now_ns(), s.live_bytes, s.live_by_usage[0], true});
  }
  a->set_live_hook(&Tracer::live_hook, this);
}

void Tracer::detach() {
  for (Stream* s : lanes_) s->set_trace_sink(nullptr);
  lanes_.clear();
  if (arena_) arena_->set_live_hook(nullptr, nullptr);
  arena_ = nullptr;
}

void Tracer::add_span(const char* label, int64_t start_ns, int64_t end_ns, int index) {
  std::lock_guard<std::mutex> lk(mu_);
  spans_.push_back(HostSpan{label, start_ns, end_ns, index});
}

void Tracer::note_stats(const ArenaStats& s) {
  std::lock_guard<std::mutex> lk(mu_);
  for (int p = 0; p < kNumPhases; p++)
    act_peak_[p] = std::max<uint64_t>(act_peak_[p], s.activation_peak_in_phase[p]);
  arena_peak_ = std::max<uint64_t>(arena_peak_, s.peak_bytes);
}

void Tracer::on_item(const TraceRecord& r) {
  std::lock_guard<std::mutex> lk(mu_);
  records_[r.op.stream_id].push_back(r);
}

// Host thread, inside Arena::alloc/free.
void Tracer::live_hook(void* ctx, size_t live, size_t activations) {
  Tracer* t = static_cast<Tracer*>(ctx);
  const RawSample smp{now_ns(), live, activations, false};
  std::lock_guard<std::mutex> lk(t->mu_);
  t->samples_.push_back(smp);
}

TraceData Tracer::data() const {
  TraceData d;
  std::lock_guard<std::mutex> lk(mu_);
  d.stream_names = names_;
  d.spans = spans_;
  d.activation_peak_in_phase = act_peak_;
  d.arena_peak_bytes = arena_peak_;

  // Per stream: waits resolved, then records by start (== launch order on an in-order
  // stream; seq breaks ties, e.g. a zero-length wait and the op it held back), each wait
  // given the block of the next op.
  std::map<int, std::vector<TraceRecord>> by_stream = records_;
  resolve_waits(&by_stream);
  for (auto& [id, v] : by_stream) {
    std::stable_sort(v.begin(), v.end(), [](const TraceRecord& a, const TraceRecord& b) {
      return a.op.start_ns != b.op.start_ns ? a.op.start_ns < b.op.start_ns : a.seq < b.seq;
    });
    int next_block = -1;
    for (size_t i = v.size(); i-- > 0;) {
      if (v[i].is_wait())
        v[i].op.block = next_block;
      else
        next_block = v[i].op.block;
    }
    d.records.insert(d.records.end(), v.begin(), v.end());
  }
  place_memory(d.records, &d.memory);
  return d;
}

// The memory curve on the stream timeline (contract at MemorySample). Caller holds mu_.
void Tracer::place_memory(const std::vector<TraceRecord>& records,
                          std::vector<MemorySample>* out) const {
  std::vector<const TraceRecord*> by_launch;  // every item of every stream, in launch order
  for (const TraceRecord& r : records)
    if (r.launch_ns > 0) by_launch.push_back(&r);
  std::stable_sort(
      by_launch.begin(), by_launch.end(),
      [](const TraceRecord* a, const TraceRecord* b) { return a->launch_ns < b->launch_ns; });
  // seg_end: the next attach_arena() call; an alloc is never moved past it.
  auto placed = [&](const RawSample& s, bool alloc, int64_t seg_end) {
    int64_t ts = s.host_ns;
    if (alloc) {  // start of the first item launched at or after the call
      auto it = std::lower_bound(by_launch.begin(), by_launch.end(), s.host_ns,
                                 [](const TraceRecord* r, int64_t t) { return r->launch_ns < t; });
      if (it != by_launch.end() && (*it)->launch_ns < seg_end) ts = (*it)->op.start_ns;
    } else {  // end of the last item launched at or before the call
      auto it = std::upper_bound(by_launch.begin(), by_launch.end(), s.host_ns,
                                 [](int64_t t, const TraceRecord* r) { return t < r->launch_ns; });
      if (it != by_launch.begin()) ts = (*std::prev(it))->op.end_ns;
    }
    return std::max(ts, s.host_ns);
  };

  struct Change {
    int64_t ts, host_ns;
    int64_t live, activations;  // signed deltas
  };
  size_t i = 0;
  while (i < samples_.size()) {
    // One segment: a baseline (attach_arena) and the samples up to the next one. A segment
    // without a baseline (cannot happen through the public API) starts from its first sample.
    const RawSample& base = samples_[i];
    int64_t live = static_cast<int64_t>(base.live);
    int64_t act = static_cast<int64_t>(base.activations);
    out->push_back(MemorySample{base.host_ns, base.host_ns, base.live, base.activations});
    std::vector<Change> changes;
    int64_t seg_end = INT64_MAX;
    for (size_t j = i + 1; j < samples_.size(); j++) {
      if (samples_[j].baseline) {
        seg_end = samples_[j].host_ns;
        break;
      }
    }
    int64_t prev_live = live, prev_act = act;
    for (i++; i < samples_.size() && !samples_[i].baseline; i++) {
      const RawSample& s = samples_[i];
      const int64_t dl = static_cast<int64_t>(s.live) - prev_live;
      const int64_t da = static_cast<int64_t>(s.activations) - prev_act;
      prev_live = static_cast<int64_t>(s.live);
      prev_act = static_cast<int64_t>(s.activations);
      if (dl == 0 && da == 0) continue;
      changes.push_back(
          Change{placed(s, dl > 0 || (dl == 0 && da > 0), seg_end), s.host_ns, dl, da});
    }
    std::stable_sort(changes.begin(), changes.end(),
                     [](const Change& a, const Change& b) { return a.ts < b.ts; });
    // Activations and workspace are summed apart and each clamped at zero: moving a free
    // to the end of the op before it can place it ahead of its own alloc when no op was
    // launched in between, and the curve must still never show activations above live.
    int64_t last = base.host_ns;
    int64_t work = live - act;
    for (const Change& c : changes) {
      act += c.activations;
      work += c.live - c.activations;
      last = std::max(last, c.ts);
      const uint64_t a = static_cast<uint64_t>(std::max<int64_t>(act, 0));
      const uint64_t w = static_cast<uint64_t>(std::max<int64_t>(work, 0));
      out->push_back(MemorySample{c.host_ns, last, a + w, a});
    }
  }
}

void Tracer::write_chrome_json(const std::string& path) const {
  const std::string json = chrome_trace_json(data());
  FILE* f = std::fopen(path.c_str(), "wb");
  REMAT_REQUIRE(f, path + ": cannot write the trace: " + std::strerror(errno));
  const bool ok = std::fwrite(json.data(), 1, json.size(), f) == json.size();
  const bool closed = std::fclose(f) == 0;
  REMAT_REQUIRE(ok && closed, path + ": error writing the trace: " + std::strerror(errno));
}

std::string chrome_trace_json(const TraceData& d) {
  using ojson = nlohmann::ordered_json;
  int64_t t0 = INT64_MAX;
  for (const TraceRecord& r : d.records) t0 = std::min(t0, r.op.start_ns);
  for (const HostSpan& s : d.spans) t0 = std::min(t0, s.start_ns);
  for (const MemorySample& m : d.memory) t0 = std::min(t0, m.ts_ns);
  if (t0 == INT64_MAX) t0 = 0;

  std::vector<ojson> events;
  events.reserve(1 + 2 * (d.stream_names.size() + 1) + d.records.size() + d.spans.size() +
                 d.memory.size());
  auto lane_name = [&](int id) {
    auto it = d.stream_names.find(id);
    return it == d.stream_names.end() ? "stream " + std::to_string(id) : it->second;
  };
  events.push_back(
      {{"ph", "M"}, {"pid", 1}, {"name", "process_name"}, {"args", {{"name", "remat"}}}});
  auto name_lane = [&](int tid, const std::string& name) {
    events.push_back({{"ph", "M"},
                      {"pid", 1},
                      {"tid", tid},
                      {"name", "thread_name"},
                      {"args", {{"name", name}}}});
    events.push_back({{"ph", "M"},
                      {"pid", 1},
                      {"tid", tid},
                      {"name", "thread_sort_index"},
                      {"args", {{"sort_index", tid}}}});
  };
  for (const auto& [id, name] : d.stream_names) name_lane(id, name);
  if (!d.spans.empty()) name_lane(kHostLaneTid, "host");

  for (const TraceRecord& r : d.records) {
    const char* label = r.op.label ? r.op.label : "";
    ojson args = {{"block", r.op.block}, {"op", label}, {"seq", r.seq}};
    if (r.is_wait()) {
      args["waited_stream"] = r.waited_stream;
      args["waited_stream_name"] = lane_name(r.waited_stream);
      args["waited_seq"] = r.waited_seq;
    }
    events.push_back({{"ph", "X"},
                      {"pid", 1},
                      {"tid", r.op.stream_id},
                      {"name", label},
                      {"cat", trace_category_name(trace_category(label))},
                      {"ts", micros(r.op.start_ns - t0)},
                      {"dur", micros(r.op.end_ns - r.op.start_ns)},
                      {"args", std::move(args)}});
  }
  for (const HostSpan& s : d.spans) {
    events.push_back({{"ph", "X"},
                      {"pid", 1},
                      {"tid", kHostLaneTid},
                      {"name", s.label ? s.label : ""},
                      {"cat", "host"},
                      {"ts", micros(s.start_ns - t0)},
                      {"dur", micros(s.end_ns - s.start_ns)},
                      {"args", {{"index", s.index}}}});
  }
  for (const MemorySample& m : d.memory) {
    events.push_back({{"ph", "C"},
                      {"pid", 1},
                      {"name", "arena bytes"},
                      {"ts", micros(m.ts_ns - t0)},
                      {"args", {{"live", m.live_bytes}, {"activations", m.activation_bytes}}}});
  }
  // {"traceEvents": [...], "displayTimeUnit": "ms"} with one event per line, so that a trace
  // reads with head and grep; every event is nlohmann's (labels that are not UTF-8 get U+FFFD).
  std::string o = "{\"traceEvents\":[";
  for (size_t i = 0; i < events.size(); i++) {
    o += i ? ",\n" : "\n";
    o += events[i].dump(-1, ' ', false, ojson::error_handler_t::replace);
  }
  o += "\n],\"displayTimeUnit\":\"ms\"}\n";
  return o;
}

}  // namespace remat
