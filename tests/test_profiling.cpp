// Profiling: exact interval arithmetic, the overlap report, wait records of CPU streams, the
// tracer's resolution of CUDA streams' waits (synthetic records), the tracer on a real traced step
// (Chrome trace JSON checked by a small parser), tracing off costing no tracer calls, and `remat
// train --trace` end to end.
#include <dirent.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "base/rng.h"
#include "kernels/common.h"
#include "models/model.h"
#include "profiling/overlap.h"
#include "profiling/tracer.h"
#include "runtime/plan.h"
#include "tests/tiny_model.h"

namespace remat {
namespace {

// ---- a minimal JSON reader (enough to check the trace and the report) ----
struct Json {
  enum Type { kNull, kBool, kNum, kStr, kArr, kObj } type = kNull;
  bool b = false;
  double num = 0;
  std::string str;
  std::vector<Json> arr;
  std::vector<std::pair<std::string, Json>> obj;
  const Json* find(const std::string& k) const {
    for (const auto& kv : obj)
      if (kv.first == k) return &kv.second;
    return nullptr;
  }
  const Json& at(const std::string& k) const {
    const Json* j = find(k);
    if (!j) throw Error("json: no key '" + k + "'");
    return *j;
  }
};

class JsonParser {
 public:
  explicit JsonParser(const std::string& s) : s_(s) {}
  Json parse() {
    Json v = value();
    ws();
    if (i_ != s_.size()) fail("trailing characters");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) {
    throw Error("json: " + what + " at offset " + std::to_string(i_));
  }
  void ws() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) i_++;
  }
  void expect(char c) {
    ws();
    if (i_ >= s_.size() || s_[i_] != c) fail(std::string("expected '") + c + "'");
    i_++;
  }
  bool literal(const char* w) {
    const size_t n = std::strlen(w);
    if (s_.compare(i_, n, w) != 0) return false;
    i_ += n;
    return true;
  }
  std::string string_lit() {
    expect('"');
    std::string o;
    for (;;) {
      if (i_ >= s_.size()) fail("unterminated string");
      const char c = s_[i_++];
      if (c == '"') return o;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in string");
      if (c != '\\') {
        o += c;
        continue;
      }
      if (i_ >= s_.size()) fail("bad escape");
      const char e = s_[i_++];
      if (e == 'u') {
        if (i_ + 4 > s_.size()) fail("bad \\u escape");
        o += static_cast<char>(std::stoi(s_.substr(i_, 4), nullptr, 16));
        i_ += 4;
      } else if (std::strchr("\"\\/bfnrt", e)) {
        o += e;
      } else {
        fail("bad escape");
      }
    }
  }
  Json value() {
    ws();
    if (i_ >= s_.size()) fail("unexpected end");
    Json v;
    const char c = s_[i_];
    if (c == '{') {
      v.type = Json::kObj;
      i_++;
      ws();
      if (i_ < s_.size() && s_[i_] == '}') {
        i_++;
        return v;
      }
      for (;;) {
        std::string k = string_lit();
        expect(':');
        v.obj.emplace_back(k, value());
        ws();
        if (i_ < s_.size() && s_[i_] == ',') {
          i_++;
          continue;
        }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.type = Json::kArr;
      i_++;
      ws();
      if (i_ < s_.size() && s_[i_] == ']') {
        i_++;
        return v;
      }
      for (;;) {
        v.arr.push_back(value());
        ws();
        if (i_ < s_.size() && s_[i_] == ',') {
          i_++;
          continue;
        }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.type = Json::kStr;
      v.str = string_lit();
      return v;
    }
    if (literal("true")) {
      v.type = Json::kBool;
      v.b = true;
      return v;
    }
    if (literal("false")) {
      v.type = Json::kBool;
      return v;
    }
    if (literal("null")) return v;
    size_t used = 0;
    try {
      v.num = std::stod(s_.substr(i_, 40), &used);
    } catch (...) {
      fail("bad value");
    }
    i_ += used;
    v.type = Json::kNum;
    return v;
  }
  const std::string& s_;
  size_t i_ = 0;
};

Json parse_json(const std::string& s) {
  return JsonParser(s).parse();
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("cannot read " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

TEST(Json, ParserRejectsMalformedInput) {
  EXPECT_NO_THROW(parse_json(R"({"a":[1,2.5e3,"x\"y",true,null],"b":{}})"));
  EXPECT_THROW(parse_json(R"({"a":1,})"), Error);
  EXPECT_THROW(parse_json(R"({"a":1} x)"), Error);
  EXPECT_THROW(parse_json(R"(["a)"), Error);
}

// ---- interval arithmetic ----
constexpr int64_t kMs = 1000000;  // ns per ms

int64_t steady_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

TEST(Intervals, UnionLengthOfSyntheticSets) {
  EXPECT_EQ(union_length({}), 0);
  EXPECT_EQ(union_length({{5, 5}, {7, 3}}), 0);                  // empty and reversed
  EXPECT_EQ(union_length({{0, 10}, {20, 25}}), 15);              // disjoint
  EXPECT_EQ(union_length({{0, 100}, {10, 20}, {30, 40}}), 100);  // nested
  EXPECT_EQ(union_length({{0, 10}, {10, 20}}), 20);              // touching
  EXPECT_EQ(union_length({{5, 15}, {0, 10}}), 15);               // overlapping, unsorted
  EXPECT_EQ(union_length({{0, 10}, {0, 10}, {0, 10}}), 10);      // repeated
  const IntervalSet n = normalize({{10, 20}, {0, 10}, {30, 30}, {25, 27}});
  ASSERT_EQ(n.size(), 2u);  // touching merged, empty dropped
  EXPECT_EQ(n[0].begin, 0);
  EXPECT_EQ(n[0].end, 20);
  EXPECT_EQ(n[1].begin, 25);
  EXPECT_EQ(n[1].end, 27);
}

TEST(Intervals, IntersectionLengthOfSyntheticSets) {
  EXPECT_EQ(intersection_length({}, {{0, 10}}), 0);
  EXPECT_EQ(intersection_length({{0, 10}}, {}), 0);
  EXPECT_EQ(intersection_length({{0, 10}}, {{20, 30}}), 0);                    // disjoint
  EXPECT_EQ(intersection_length({{0, 10}}, {{10, 20}}), 0);                    // touching
  EXPECT_EQ(intersection_length({{20, 30}}, {{0, 100}}), 10);                  // fully covered
  EXPECT_EQ(intersection_length({{0, 100}}, {{20, 30}, {40, 45}}), 15);        // covers both
  EXPECT_EQ(intersection_length({{0, 10}, {20, 30}}, {{5, 25}}), 10);          // two pieces
  EXPECT_EQ(intersection_length({{0, 10}, {5, 15}}, {{0, 100}}), 15);          // no double count
  EXPECT_EQ(intersection_length({{0, 10}, {5, 15}}, {{0, 10}, {5, 15}}), 15);  // self
  EXPECT_EQ(intersection_length({{3, 3}}, {{0, 10}}), 0);                      // empty interval
}

TEST(Intervals, AgreeWithBitmapCountingOnRandomSets) {
  Philox rng(42, 1);
  constexpr int kGrid = 200;
  for (int trial = 0; trial < 300; trial++) {
    IntervalSet a, b;
    std::vector<int> in_a(kGrid, 0), in_b(kGrid, 0);
    const int na = rng.next_u32() % 6, nb = rng.next_u32() % 6;
    for (int k = 0; k < na + nb; k++) {
      const int64_t lo = rng.next_u32() % kGrid, len = rng.next_u32() % 40;
      const int64_t hi = std::min<int64_t>(kGrid, lo + len);
      (k < na ? a : b).push_back({lo, hi});
      for (int64_t t = lo; t < hi; t++) (k < na ? in_a : in_b)[t] = 1;
    }
    int64_t ua = 0, both = 0;
    for (int t = 0; t < kGrid; t++) {
      ua += in_a[t];
      both += in_a[t] && in_b[t];
    }
    ASSERT_EQ(union_length(a), ua) << "trial " << trial;
    ASSERT_EQ(intersection_length(a, b), both) << "trial " << trial;
    ASSERT_EQ(intersection_length(b, a), both) << "trial " << trial;
  }
}

// ---- the overlap report on a synthetic trace ----
TraceRecord rec(const char* label, int stream, int64_t a, int64_t b, int block, int waited = -1) {
  return TraceRecord{OpRecord{label, stream, a * kMs, b * kMs, block}, 0, waited};
}

TEST(OverlapReport, ExactOnSyntheticTrace) {
  TraceData d;
  d.stream_names = {{0, "main"}, {1, "side"}};
  d.records = {
      rec("fwd.qkv", 0, 0, 10, 0),        rec("fwd.fc", 0, 10, 20, 0),
      rec("wait", 0, 20, 25, 1, 1),  // exposed: waited on the side stream
      rec("bwd.fc", 0, 25, 40, 1),        rec("wait", 0, 40, 42, 0, 2),  // another stream
      rec("recompute.ln1", 1, 5, 15, 1),  rec("recompute.qkv", 1, 15, 27, 1),
      rec("poison", 1, 30, 31, -1),  // side-stream work that is not recompute
      rec("wait", 1, 0, 5, -1, 0),   // the side stream's own wait: not exposed
      rec("recompute.ln1", 1, 44, 46, 0), rec("fwd.qkv", 2, 0, 50, 0),  // stream 2: ignored
  };
  d.spans = {HostSpan{"step", 0, 50 * kMs, 1}, HostSpan{"other", 0, 60 * kMs, -1}};
  d.memory = {MemorySample{0, 0, 100, 60}, MemorySample{1, 1, 300, 200},
              MemorySample{2, 2, 50, 10}};
  d.activation_peak_in_phase = {1, 2, 3, 4};
  d.arena_peak_bytes = 400;
  const OverlapReport r = overlap_report(d, 0, 1);
  EXPECT_EQ(r.main_stream, "main");
  EXPECT_EQ(r.side_stream, "side");
  EXPECT_EQ(r.steps, 1);
  EXPECT_DOUBLE_EQ(r.step_ms, 50);
  EXPECT_DOUBLE_EQ(r.window_ms, 50);
  EXPECT_DOUBLE_EQ(r.main_busy_ms, 35);             // [0,20) + [25,40)
  EXPECT_DOUBLE_EQ(r.main_wait_ms, 7);              // [20,25) + [40,42)
  EXPECT_DOUBLE_EQ(r.main_idle_ms, 8);              // 50 - 42
  EXPECT_DOUBLE_EQ(r.side_busy_ms, 25);             // [5,27) + [30,31) + [44,46)
  EXPECT_DOUBLE_EQ(r.recompute_ms, 24);             // [5,27) + [44,46)
  EXPECT_DOUBLE_EQ(r.recompute_overlapped_ms, 17);  // [5,20) + [25,27)
  EXPECT_DOUBLE_EQ(r.recompute_hidden_fraction, 17.0 / 24.0);
  EXPECT_DOUBLE_EQ(r.exposed_recompute_ms, 5);
  EXPECT_EQ(r.exposed_waits, 1);
  EXPECT_DOUBLE_EQ(r.exposed_outside_blocks_ms, 0);
  EXPECT_EQ(r.arena_live_peak, 300u);
  EXPECT_EQ(r.activation_live_peak, 200u);
  EXPECT_EQ(r.activation_peak_in_phase[2], 3u);
  EXPECT_EQ(r.arena_peak_bytes, 400u);
  ASSERT_EQ(r.blocks.size(), 2u);
  EXPECT_EQ(r.blocks[0].block, 0);
  EXPECT_DOUBLE_EQ(r.blocks[0].recompute_ms, 2);
  EXPECT_DOUBLE_EQ(r.blocks[0].overlapped_ms, 0);
  EXPECT_DOUBLE_EQ(r.blocks[0].exposed_ms, 0);
  EXPECT_EQ(r.blocks[1].block, 1);
  EXPECT_DOUBLE_EQ(r.blocks[1].recompute_ms, 22);
  EXPECT_DOUBLE_EQ(r.blocks[1].overlapped_ms, 17);
  EXPECT_DOUBLE_EQ(r.blocks[1].exposed_ms, 5);

  // A wait that held back an op of no block (block -1) is exposed outside the blocks.
  TraceData d2 = d;
  d2.records.push_back(rec("wait", 0, 42, 45, -1, 1));
  const OverlapReport r2 = overlap_report(d2, 0, 1);
  EXPECT_DOUBLE_EQ(r2.exposed_recompute_ms, 8);
  EXPECT_DOUBLE_EQ(r2.exposed_outside_blocks_ms, 3);
  EXPECT_DOUBLE_EQ(r2.main_wait_ms, 10);  // [20,25) + [40,42) + [42,45)

  // Without step spans the window is the hull of the two streams' records: [0, 46).
  d.spans.clear();
  const OverlapReport h = overlap_report(d, 0, 1);
  EXPECT_EQ(h.steps, 0);
  EXPECT_DOUBLE_EQ(h.step_ms, 0);
  EXPECT_DOUBLE_EQ(h.window_ms, 46);
  EXPECT_DOUBLE_EQ(h.main_idle_ms, 4);  // [42, 46)

  const Json j = parse_json(to_json(r));
  EXPECT_DOUBLE_EQ(j.at("exposed_recompute_ms").num, 5);
  EXPECT_DOUBLE_EQ(j.at("recompute_overlapped_ms").num, 17);
  EXPECT_EQ(j.at("blocks").arr.size(), 2u);
  EXPECT_DOUBLE_EQ(j.at("activation_peak_in_phase").at("recompute").num, 3);
}

TEST(OverlapReport, EmptyTraceIsAllZero) {
  const OverlapReport r = overlap_report(TraceData{}, 0, 1);
  EXPECT_EQ(r.window_ms, 0);
  EXPECT_EQ(r.recompute_ms, 0);
  EXPECT_EQ(r.recompute_hidden_fraction, 0);
  EXPECT_NO_THROW(parse_json(to_json(r)));
}

// ---- wait records of CPU streams ----
struct ItemCollector : ItemTraceSink {
  std::mutex mu;
  std::vector<TraceRecord> items;
  void on_item(const TraceRecord& r) override {
    std::lock_guard<std::mutex> lk(mu);
    items.push_back(r);
  }
};

TEST(CpuStreamTrace, ItemSinkGetsTimedCrossStreamWaits) {
  auto a = make_cpu_stream("waiter", 3);
  auto b = make_cpu_stream("producer", 4);
  ItemCollector sink;
  a->set_trace_sink(&sink);
  b->set_trace_sink(&sink);
  // The producer's slow op starts once the waiter has run its first op, so the waiter
  // begins waiting long before the slow op ends.
  std::atomic<bool> first_done{false};
  a->launch([&] { first_done = true; }, "fwd.qkv", 2);
  b->launch(
      [&] {
        while (!first_done) std::this_thread::yield();
        std::this_thread::sleep_for(std::chrono::milliseconds(200));
      },
      "slow");
  a->wait(b->record());
  a->wait(Event{});  // invalid: no item
  a->launch([] {}, "bwd.fc", 2);
  a->synchronize();
  b->synchronize();
  a->set_trace_sink(nullptr);
  b->set_trace_sink(nullptr);
  std::vector<TraceRecord> on_a;
  const TraceRecord* slow = nullptr;
  for (const TraceRecord& t : sink.items) {
    if (t.op.stream_id == 3) on_a.push_back(t);
    if (t.op.stream_id == 4) slow = &t;
  }
  ASSERT_EQ(on_a.size(), 3u);
  ASSERT_NE(slow, nullptr);
  EXPECT_STREQ(slow->op.label, "slow");
  const TraceRecord& w = on_a[1];
  EXPECT_STREQ(w.op.label, "wait");
  EXPECT_TRUE(w.is_wait());
  EXPECT_EQ(w.waited_stream, 4);
  EXPECT_EQ(w.op.block, -1);
  EXPECT_LT(w.op.start_ns, slow->op.end_ns);  // began waiting while the event was pending
  EXPECT_GE(w.op.end_ns, slow->op.end_ns);    // ended once it was complete
  EXPECT_FALSE(on_a[0].is_wait());
  EXPECT_FALSE(on_a[2].is_wait());
  EXPECT_EQ(on_a[0].seq, 1u);
  EXPECT_EQ(w.seq, 2u);
  EXPECT_EQ(on_a[2].seq, 3u);
  EXPECT_LE(on_a[0].op.end_ns, w.op.start_ns);
  EXPECT_LE(w.op.end_ns, on_a[2].op.start_ns);
  for (const TraceRecord& t : sink.items) {  // launched by the host before they ran
    EXPECT_GT(t.launch_ns, 0);
    EXPECT_LE(t.launch_ns, t.op.start_ns);
  }
}

// The memory curve: an alloc takes effect when the first item launched after it starts, a
// free when the last item launched before it ends; the curve is the running sum in that order.
TEST(TracerMemory, AllocsAndFreesArePlacedOnTheStreamTimeline) {
  Arena arena(SIZE_MAX, nullptr);  // dry: bookkeeping only
  Block kept = arena.alloc(512, nullptr, Phase::kForward, Usage::kWorkspace, "kept");
  Tracer tracer;
  tracer.attach_arena(&arena);
  auto item = [&](int stream, int64_t launch, int64_t start, int64_t end) {
    tracer.on_item(TraceRecord{OpRecord{"fwd.qkv", stream, start, end, 0}, 1, -1, launch});
  };
  Block a = arena.alloc(1000, nullptr, Phase::kForward, Usage::kActivation, "a");  // 1024 B
  const int64_t t1 = steady_ns();
  item(0, t1, t1 + 10 * kMs, t1 + 20 * kMs);  // a's user, on stream 0
  Block b = arena.alloc(2048, nullptr, Phase::kRecompute, Usage::kActivation, "b");
  const int64_t t2 = steady_ns();
  item(1, t2, t1 + 5 * kMs, t1 + 30 * kMs);  // b's user, on stream 1: starts before a's
  arena.free(a, nullptr);                    // after b's launch: lasts until t1 + 30 ms
  arena.free(b, nullptr);
  tracer.detach();
  arena.free(kept, nullptr);  // detached: not sampled

  const std::vector<MemorySample> m = tracer.data().memory;
  ASSERT_EQ(m.size(), 5u);
  EXPECT_EQ(m[0].live_bytes, 512u);  // the baseline at attach_arena()
  EXPECT_EQ(m[0].activation_bytes, 0u);
  EXPECT_EQ(m[1].ts_ns, t1 + 5 * kMs);  // b first: its user started first
  EXPECT_EQ(m[1].live_bytes, 512u + 2048u);
  EXPECT_EQ(m[1].activation_bytes, 2048u);
  EXPECT_EQ(m[2].ts_ns, t1 + 10 * kMs);  // then a
  EXPECT_EQ(m[2].live_bytes, 512u + 2048u + 1024u);
  EXPECT_EQ(m[3].ts_ns, t1 + 30 * kMs);  // both frees: after the last launch before them
  EXPECT_EQ(m[4].ts_ns, t1 + 30 * kMs);
  EXPECT_EQ(m[4].live_bytes, 512u);
  EXPECT_EQ(m[4].activation_bytes, 0u);
  for (size_t i = 1; i < m.size(); i++) EXPECT_GE(m[i].ts_ns, m[i - 1].ts_ns);
}

// ---- waits of CUDA streams: unresolved records the tracer resolves ----
// What a CUDA stream delivers (runtime/cuda/cuda_stream.h): an op record (one per kernel with
// CUPTI, all of one op sharing its seq) timed on the GPU, and each cross-stream wait
// unresolved ([0, 0]) with the waited event's position in the waited stream's launch order.
// Times in ms after kBase (a trace time of 0 would read as unresolved).
constexpr int64_t kBase = 1000 * kMs;
TraceRecord cuda_op(const char* label, int stream, uint64_t seq, int64_t launch, int64_t a,
                    int64_t b, int block) {
  return TraceRecord{OpRecord{label, stream, kBase + a * kMs, kBase + b * kMs, block}, seq, -1,
                     kBase + launch * kMs};
}
TraceRecord cuda_wait(int stream, uint64_t seq, int64_t launch, int waited, uint64_t waited_seq) {
  return TraceRecord{OpRecord{"wait", stream, 0, 0, -1}, seq, waited, kBase + launch * kMs,
                     waited_seq};
}

// Stream `id`'s records of a resolved trace, in TraceData order.
std::vector<TraceRecord> on_stream(const TraceData& d, int id) {
  std::vector<TraceRecord> out;
  for (const TraceRecord& r : d.records)
    if (r.op.stream_id == id) out.push_back(r);
  return out;
}

// Main stream 0 and side stream 1, as synchronize() delivers them (ops, then the waits):
//   side  seq 1 recompute.ln1  [12, 30]   seq 2 recompute.qkv  [30, 34] + [35, 40] (2 kernels)
//         seq 3 recompute.ln1  [40, 70]
//   main  seq 1 fwd.qkv [10, 20]  seq 2 fwd.fc [20, 25]  seq 3 WAIT side <= 2
//         seq 4 bwd.fc [41, 45] + [46, 50] (2 kernels)   seq 5 WAIT side <= 1
//         seq 6 bwd.qkv [52, 60]  seq 7 WAIT side <= 3  seq 8 WAIT stream 5 <= 9 (not traced)
//         seq 9 WAIT side, position unknown              seq 10 bwd.ln1 [70, 80]
// Expected waits: seq 3 [25, 40] (side ends after main's previous op: 15 ms exposed, the
// side op's later kernel counts); seq 5 [50, 50] (side long done); seq 7 [60, 70];
// seq 8 and 9 [70, 70] (waited work not in the trace).
TEST(CudaWaitResolution, WaitsAreResolvedFromTheRecordsAroundThem) {
  Tracer tracer;
  for (const TraceRecord& r : {
           cuda_op("recompute.ln1", 1, 1, 1, 12, 30, 1),
           cuda_op("recompute.qkv", 1, 2, 2, 30, 34, 1),
           cuda_op("recompute.qkv", 1, 2, 2, 35, 40, 1),
           cuda_op("recompute.ln1", 1, 3, 3, 40, 70, 0),
           cuda_op("fwd.qkv", 0, 1, 0, 10, 20, 0),
           cuda_op("fwd.fc", 0, 2, 1, 20, 25, 0),
           cuda_op("bwd.fc", 0, 4, 4, 41, 45, 1),
           cuda_op("bwd.fc", 0, 4, 4, 46, 50, 1),
           cuda_op("bwd.qkv", 0, 6, 6, 52, 60, 1),
           cuda_op("bwd.ln1", 0, 10, 10, 70, 80, 0),
           cuda_wait(0, 3, 3, 1, 2),
           cuda_wait(0, 5, 5, 1, 1),
           cuda_wait(0, 7, 7, 1, 3),
           cuda_wait(0, 8, 8, 5, 9),
           cuda_wait(0, 9, 9, 1, 0),
       })
    tracer.on_item(r);
  const TraceData d = tracer.data();
  const std::vector<TraceRecord> on_main = on_stream(d, 0);
  const char* const labels[] = {"fwd.qkv", "fwd.fc", "wait", "bwd.fc", "bwd.fc", "wait",
                                "bwd.qkv", "wait",   "wait", "wait",   "bwd.ln1"};
  const uint64_t seqs[] = {1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10};
  ASSERT_EQ(on_main.size(), 11u);
  for (size_t i = 0; i < on_main.size(); i++) {
    EXPECT_STREQ(on_main[i].op.label, labels[i]) << i;
    EXPECT_EQ(on_main[i].seq, seqs[i]) << i;
  }
  struct Want {
    size_t index;
    int64_t start, end;  // ms after kBase
    int block;           // of the op it held back
  };
  for (const Want& w : {Want{2, 25, 40, 1}, Want{5, 50, 50, 1}, Want{7, 60, 70, 0},
                        Want{8, 70, 70, 0}, Want{9, 70, 70, 0}}) {
    const TraceRecord& r = on_main[w.index];
    ASSERT_TRUE(r.is_wait()) << w.index;
    EXPECT_FALSE(r.is_unresolved_wait()) << w.index;
    EXPECT_EQ(r.op.start_ns, kBase + w.start * kMs) << "wait seq " << r.seq;
    EXPECT_EQ(r.op.end_ns, kBase + w.end * kMs) << "wait seq " << r.seq;
    EXPECT_EQ(r.op.block, w.block) << "wait seq " << r.seq;
  }
  EXPECT_EQ(on_main[2].waited_seq, 2u);  // kept for the trace
  EXPECT_EQ(on_main[8].waited_stream, 5);

  const OverlapReport rep = overlap_report(d, 0, 1);
  EXPECT_DOUBLE_EQ(rep.exposed_recompute_ms, 25);  // 15 + 0 + 10 + 0 (seq 8: another stream)
  EXPECT_EQ(rep.exposed_waits, 4);
  EXPECT_DOUBLE_EQ(rep.window_ms, 70);     // hull [10, 80]
  EXPECT_DOUBLE_EQ(rep.main_busy_ms, 41);  // [10,25) [41,45) [46,50) [52,60) [70,80)
  EXPECT_DOUBLE_EQ(rep.main_wait_ms, 25);  // [25,40) [60,70)
  EXPECT_DOUBLE_EQ(rep.main_idle_ms, 4);   // [40,41) [45,46) [50,52)
  ASSERT_EQ(rep.blocks.size(), 2u);
  EXPECT_DOUBLE_EQ(rep.blocks[0].exposed_ms, 10);  // seq 7 held back bwd.ln1 (block 0)
  EXPECT_DOUBLE_EQ(rep.blocks[1].exposed_ms, 15);  // seq 3 held back bwd.fc (block 1)

  // The stored records stay as delivered: resolving is data()'s, every time.
  const TraceData again = tracer.data();
  ASSERT_EQ(again.records.size(), d.records.size());
  for (size_t i = 0; i < d.records.size(); i++)
    EXPECT_EQ(again.records[i].op.end_ns, d.records[i].op.end_ns);
}

// A wait the host issued late (after the waited work and the stream's previous op were done)
// cannot have held the stream back: it starts at its launch, and is empty. Its next op has no
// record (an op without GPU work): the waited work's end bounds the wait alone.
TEST(CudaWaitResolution, StartsNoEarlierThanItsLaunchAndNeedsNoNextOp) {
  Tracer tracer;
  tracer.on_item(cuda_op("recompute.ln1", 1, 1, 0, 0, 95, 2));
  tracer.on_item(cuda_op("bwd.fc", 0, 1, 0, 10, 80, 2));
  tracer.on_item(cuda_wait(0, 2, 100, 1, 1));  // host late: launched at 100
  tracer.on_item(cuda_wait(0, 3, 0, 1, 1));    // launched at 0: only the op before bounds it
  const std::vector<TraceRecord> late = on_stream(tracer.data(), 0);
  ASSERT_EQ(late.size(), 3u);
  EXPECT_EQ(late[1].op.start_ns, kBase + 100 * kMs);
  EXPECT_EQ(late[1].op.end_ns, kBase + 100 * kMs);
  EXPECT_EQ(late[2].op.start_ns, kBase + 100 * kMs);  // after the wait before it
  EXPECT_EQ(late[2].op.end_ns, kBase + 100 * kMs);

  Tracer early;
  early.on_item(cuda_op("recompute.ln1", 1, 1, 0, 0, 95, 2));
  early.on_item(cuda_op("bwd.fc", 0, 1, 0, 10, 80, 2));
  early.on_item(cuda_wait(0, 2, 1, 1, 1));  // no op follows on stream 0
  const std::vector<TraceRecord> w = on_stream(early.data(), 0);
  ASSERT_EQ(w.size(), 2u);
  EXPECT_EQ(w[1].op.start_ns, kBase + 80 * kMs);
  EXPECT_EQ(w[1].op.end_ns, kBase + 95 * kMs);
  EXPECT_EQ(w[1].op.block, -1);  // held back no op
  EXPECT_DOUBLE_EQ(overlap_report(early.data(), 0, 1).exposed_recompute_ms, 15);
}

// The memory curve with CUDA-stream records: changes are placed by launch_ns as on CPU
// streams, an op with several kernel records ends at its last, and an alloc made before a
// wait takes effect when the resolved wait starts.
TEST(CudaWaitResolution, MemoryCurveUsesLaunchTimesOfCudaRecords) {
  Arena arena(SIZE_MAX, nullptr);  // dry: bookkeeping only
  Tracer tracer;
  const int64_t t0 = steady_ns();
  auto at = [&](int64_t ms) { return t0 + 1000 * kMs + ms * kMs; };  // GPU time, far ahead
  // The side op, launched before anything below: [at(5), at(25)].
  tracer.on_item(TraceRecord{OpRecord{"recompute.ln1", 1, at(5), at(25), 0}, 1, -1, t0});
  tracer.attach_arena(&arena);
  Block a = arena.alloc(1024, nullptr, Phase::kForward, Usage::kActivation, "a");
  const int64_t t1 = steady_ns();
  tracer.on_item(TraceRecord{OpRecord{"fwd.qkv", 0, at(10), at(12), 0}, 1, -1, t1});
  tracer.on_item(TraceRecord{OpRecord{"fwd.qkv", 0, at(13), at(20), 0}, 1, -1, t1});
  arena.free(a, nullptr);  // after its op: at that op's last kernel's end
  Block d = arena.alloc(2048, nullptr, Phase::kBackward, Usage::kWorkspace, "d");
  tracer.on_item(TraceRecord{OpRecord{"wait", 0, 0, 0, -1}, 2, 1, steady_ns(), 1});
  Block b = arena.alloc(4096, nullptr, Phase::kBackward, Usage::kActivation, "b");
  const int64_t t3 = steady_ns();
  tracer.on_item(TraceRecord{OpRecord{"bwd.qkv", 0, at(30), at(40), 0}, 3, -1, t3});
  arena.free(b, nullptr);
  arena.free(d, nullptr);
  tracer.detach();

  const TraceData data = tracer.data();
  const std::vector<TraceRecord> on_main = on_stream(data, 0);
  ASSERT_EQ(on_main.size(), 4u);
  EXPECT_EQ(on_main[2].op.start_ns, at(20));  // the wait: after fwd.qkv, until the side op ends
  EXPECT_EQ(on_main[2].op.end_ns, at(25));
  const std::vector<MemorySample>& m = data.memory;
  ASSERT_EQ(m.size(), 7u);
  const int64_t want_ts[] = {at(10), at(20), at(20), at(30), at(40), at(40)};
  const uint64_t want_live[] = {1024, 0, 2048, 2048 + 4096, 2048, 0};
  for (int i = 0; i < 6; i++) {
    EXPECT_EQ(m[i + 1].ts_ns, want_ts[i]) << "change " << i;
    EXPECT_EQ(m[i + 1].live_bytes, want_live[i]) << "change " << i;
  }
}

// Counts every call; records nothing.
struct CountingSink : ItemTraceSink {
  std::atomic<int> calls{0};
  void on_item(const TraceRecord&) override { calls++; }
};

// ---- a traced step of a tiny model ----
struct TinyRun {
  ModelConfig c = test::tiny_config(3);
  int B = 2, T = 16;
  std::vector<float> params = test::init(c);
  std::vector<float> grads = std::vector<float>(params.size(), 0.0f);
  std::vector<int> in = test::random_tokens(size_t(B) * T, c.vocab_size, 1);
  std::vector<int> tg = test::random_tokens(size_t(B) * T, c.vocab_size, 2);
  ModelRunner runner{c, B, T, parse_plan("full", c), ActDType::kFP32, ScheduleOptions{}, false};
  float step() {
    return runner.forward_backward(params.data(), grads.data(), in.data(), tg.data(),
                                   1.0f / (B * T));
  }
};

TEST(Tracing, OffMeansNoTracerCalls) {
  TinyRun run;
  CountingSink sink;
  run.runner.main_stream()->set_trace_sink(&sink);
  run.runner.side_stream()->set_trace_sink(&sink);
  run.step();
  const int attached_calls = sink.calls.load();
  EXPECT_GT(attached_calls, 0);  // the counter does count when attached
  run.runner.main_stream()->set_trace_sink(nullptr);
  run.runner.side_stream()->set_trace_sink(nullptr);
  run.step();
  run.step();
  EXPECT_EQ(sink.calls.load(), attached_calls);

  // A detached Tracer records nothing more (streams and arena hook alike).
  Tracer tracer;
  tracer.attach(run.runner.main_stream());
  tracer.attach(run.runner.side_stream());
  tracer.attach_arena(&run.runner.arena());
  run.step();
  tracer.detach();
  const TraceData before = tracer.data();
  run.step();
  const TraceData after = tracer.data();
  EXPECT_GT(before.records.size(), 0u);
  EXPECT_GT(before.memory.size(), 0u);
  EXPECT_EQ(after.records.size(), before.records.size());
  EXPECT_EQ(after.memory.size(), before.memory.size());
}

TEST(Tracing, TracedStepWritesChromeTraceAndAConsistentReport) {
  TinyRun run;
  run.step();  // warm-up, untraced
  Tracer tracer;
  const int L = run.c.num_layers;
  Stream* main = run.runner.main_stream();
  Stream* side = run.runner.side_stream();
  tracer.attach(main);
  tracer.attach(side);
  tracer.attach_arena(&run.runner.arena());
  run.runner.reset_peaks();
  const int64_t t0 = steady_ns();
  const float loss = run.step();
  const int64_t t1 = steady_ns();
  tracer.add_span("step", t0, t1, 2);
  tracer.note_stats(run.runner.stats());
  tracer.detach();
  EXPECT_TRUE(std::isfinite(loss));

  test::TempDir dir;
  const std::string path = dir / "trace.json";
  tracer.write_chrome_json(path);
  const Json j = parse_json(read_file(path));
  const Json& ev = j.at("traceEvents");
  ASSERT_EQ(ev.type, Json::kArr);

  std::map<int, std::string> lane_names;
  std::map<int, int> ops_per_lane;
  std::map<int, double> recompute_us_per_block;
  double recompute_us = 0, exposed_us = 0, main_busy_us = 0;
  int exposed_waits = 0;
  std::vector<double> live;
  double last_counter_ts = -1;
  bool counter_ts_sorted = true;
  for (const Json& e : ev.arr) {
    const std::string ph = e.at("ph").str;
    const std::string name = e.at("name").str;
    if (ph == "M" && name == "thread_name")
      lane_names[int(e.at("tid").num)] = e.at("args").at("name").str;
    if (ph == "X") {
      const int tid = int(e.at("tid").num);
      const double dur = e.at("dur").num;
      ASSERT_GE(dur, 0);
      ASSERT_GE(e.at("ts").num, 0);
      const std::string cat = e.at("cat").str;
      if (tid == kHostLaneTid) continue;
      EXPECT_EQ(e.at("args").at("op").str, name);
      ops_per_lane[tid]++;
      if (tid == side->id() && cat == "recompute") {
        recompute_us += dur;
        const int block = int(e.at("args").at("block").num);
        EXPECT_TRUE(block >= 0 && block < L) << name;
        recompute_us_per_block[block] += dur;
      }
      if (tid == main->id() && cat == "wait" &&
          int(e.at("args").at("waited_stream").num) == side->id()) {
        exposed_us += dur;
        exposed_waits++;
        EXPECT_EQ(e.at("args").at("waited_stream_name").str, side->name());
      }
      if (tid == main->id() && cat != "wait") main_busy_us += dur;
    }
    if (ph == "C") {
      EXPECT_EQ(name, "arena bytes");
      const double ts = e.at("ts").num;
      counter_ts_sorted = counter_ts_sorted && ts >= last_counter_ts;
      last_counter_ts = ts;
      live.push_back(e.at("args").at("live").num);
      EXPECT_LE(e.at("args").at("activations").num, live.back());
    }
  }
  EXPECT_EQ(lane_names[main->id()], "remat-main");
  EXPECT_EQ(lane_names[side->id()], "remat-recompute");
  EXPECT_EQ(lane_names[kHostLaneTid], "host");
  EXPECT_GT(ops_per_lane[main->id()], 10 * L);
  EXPECT_GT(ops_per_lane[side->id()], 5 * L);
  EXPECT_EQ(recompute_us_per_block.size(), size_t(L));  // plan "full": every block rebuilt
  EXPECT_GE(exposed_waits, L);  // the ready event before each block's backward
  EXPECT_TRUE(counter_ts_sorted);
  ASSERT_GE(live.size(), 4u);
  const double peak = *std::max_element(live.begin(), live.end());
  EXPECT_GT(peak, live.front());  // the counter rises ...
  EXPECT_LT(live.back(), peak);   // ... and falls

  // The report agrees with sums taken from the trace file (ops on one stream never
  // overlap, so sums are unions; the file's µs carry exact ns).
  const OverlapReport r = overlap_report(tracer.data(), main->id(), side->id());
  EXPECT_NEAR(r.recompute_ms, recompute_us / 1000, 1e-9);
  EXPECT_NEAR(r.exposed_recompute_ms, exposed_us / 1000, 1e-9);
  EXPECT_NEAR(r.main_busy_ms, main_busy_us / 1000, 1e-9);
  EXPECT_EQ(r.exposed_waits, exposed_waits);
  double exposed_in_blocks = 0;
  for (const BlockOverlap& b : r.blocks) exposed_in_blocks += b.exposed_ms;
  EXPECT_NEAR(exposed_in_blocks + r.exposed_outside_blocks_ms, r.exposed_recompute_ms, 1e-9);
  EXPECT_EQ(r.steps, 1);
  EXPECT_NEAR(r.window_ms, (t1 - t0) / 1e6, 1e-9);
  EXPECT_NEAR(r.main_busy_ms + r.main_wait_ms + r.main_idle_ms, r.window_ms, 1e-9);
  EXPECT_LE(r.recompute_overlapped_ms, r.recompute_ms + 1e-12);
  EXPECT_GT(r.recompute_ms, 0);
  ASSERT_EQ(r.blocks.size(), size_t(L));
  for (const BlockOverlap& b : r.blocks)
    EXPECT_NEAR(b.recompute_ms, recompute_us_per_block[b.block] / 1000, 1e-9);
  EXPECT_EQ(r.arena_live_peak, uint64_t(peak));
  EXPECT_EQ(r.arena_peak_bytes, run.runner.stats().peak_bytes);
  EXPECT_GT(r.activation_peak_in_phase[static_cast<int>(Phase::kRecompute)], 0u);
  EXPECT_EQ(r.activation_peak_in_phase, run.runner.stats().activation_peak_in_phase);

  // A wait is attributed to the block of the op it held back: each block's backward starts
  // right after its ready wait on the side stream, attributed to that block.
  const TraceData data = tracer.data();
  std::vector<int> ready_waits;
  for (size_t i = 0; i + 1 < data.records.size(); i++) {
    const TraceRecord& w = data.records[i];
    const TraceRecord& next = data.records[i + 1];
    if (w.op.stream_id != main->id() || !w.is_wait() || w.waited_stream != side->id()) continue;
    if (next.op.stream_id != main->id() || std::strcmp(next.op.label, "bwd.fcproj") != 0) continue;
    EXPECT_EQ(w.op.block, next.op.block);
    ready_waits.push_back(w.op.block);
  }
  EXPECT_EQ(ready_waits, (std::vector<int>{2, 1, 0}));
}

// ---- `remat train --trace` end to end ----
struct CommandResult {
  int status;
  std::string output;
};

CommandResult run_command(const std::string& cmd) {
  CommandResult r{-1, ""};
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  r.status = pclose(p);
  return r;
}

bool exists(const std::string& path) {
  return std::ifstream(path).good();
}

std::vector<std::string> list_dir(const std::string& path) {
  std::vector<std::string> names;
  if (DIR* d = opendir(path.c_str())) {
    while (dirent* e = readdir(d))
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0)
        names.push_back(e->d_name);
    closedir(d);
  }
  std::sort(names.begin(), names.end());
  return names;
}

TEST(TraceCli, TrainWritesTraceAndOverlapReport) {
  test::TempDir dir;
  const std::string shard = dir / "tok_000.bin";
  test::write_random_shard(shard, 4096, 300, 5);
  const std::string base = std::string(REMAT_BINARY) + " train --model tiny --vocab 300 --data " +
                           shard + " --val-data " + shard +
                           " --steps 3 --batch 2 --seq 16 --recompute full "
                           "--eval-batches 1 --sample-tokens 0 --out ''";
  const std::string trace = dir / "t.json";
  const CommandResult r = run_command(base + " --trace " + trace + " --trace-steps 2:3");
  ASSERT_EQ(r.status, 0) << r.output;
  EXPECT_NE(r.output.find("overlap report"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("exposed recompute"), std::string::npos) << r.output;

  const Json t = parse_json(read_file(trace));
  int steps = 0;
  std::map<int, int> ops;
  for (const Json& e : t.at("traceEvents").arr) {
    if (e.at("ph").str != "X") continue;
    const int tid = int(e.at("tid").num);
    if (tid == kHostLaneTid && e.at("name").str == "step") {
      steps++;
      EXPECT_TRUE(e.at("args").at("index").num == 2 || e.at("args").at("index").num == 3);
    }
    ops[tid]++;
  }
  EXPECT_EQ(steps, 2);
  EXPECT_GT(ops[0], 0);
  EXPECT_GT(ops[1], 0);

  const Json rep = parse_json(read_file(dir / "t.overlap.json"));
  EXPECT_EQ(rep.at("steps").num, 2);
  EXPECT_GT(rep.at("recompute_ms").num, 0);
  EXPECT_GE(rep.at("exposed_recompute_ms").num, 0);
  EXPECT_EQ(rep.at("main_stream").str, "remat-main");

  // Without --trace nothing is written (run in a fresh directory that holds only the shard);
  // a bad window is an error naming the option.
  test::TempDir quiet;
  const CommandResult off = run_command("cd " + quiet.path + " && " + base);
  ASSERT_EQ(off.status, 0) << off.output;
  EXPECT_EQ(off.output.find("overlap report"), std::string::npos);
  EXPECT_TRUE(list_dir(quiet.path).empty());
  const std::string untraced = dir / "u.json";
  const CommandResult bad = run_command(base + " --trace " + untraced + " --trace-steps 3:2");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.output.find("--trace-steps"), std::string::npos) << bad.output;
  const CommandResult late = run_command(base + " --trace " + untraced + " --trace-steps 3:4");
  EXPECT_NE(late.status, 0);
  EXPECT_FALSE(exists(untraced));
}

}  // namespace
}  // namespace remat
