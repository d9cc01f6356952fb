// Tests of the CPU runtime core: streams/events (runtime/stream.h) and the activation arena
// (runtime/arena.h). Plain (non-atomic) shared variables are used on purpose where the
// runtime promises ordering: a missing happens-before edge is then a data race that the
// ThreadSanitizer build reports, besides the value checks failing.
#include <gtest/gtest.h>
#include <pthread.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/common.h"
#include "runtime/arena.h"
#include "runtime/stream.h"

namespace remat {
namespace {

using std::chrono::milliseconds;

// ---------------------------------------------------------------- streams

TEST(CpuStream, RunsItemsInLaunchOrder) {
  auto s = make_cpu_stream("order", 0);
  std::vector<int> seen;  // touched only by the worker until synchronize()
  for (int i = 0; i < 1000; ++i) s->launch([&seen, i] { seen.push_back(i); }, "push");
  s->synchronize();
  ASSERT_EQ(seen.size(), 1000u);
  for (int i = 0; i < 1000; ++i) EXPECT_EQ(seen[i], i);
}

TEST(CpuStream, RecordCountsLaunchedItemsAndDoneFollowsCompletion) {
  auto s = make_cpu_stream("events", 3);
  EXPECT_EQ(s->id(), 3);
  EXPECT_EQ(s->name(), "events");
  EXPECT_TRUE(s->done(Event{}));
  EXPECT_FALSE(s->record().valid());  // nothing launched yet: already complete
  std::mutex gate;
  gate.lock();
  s->launch([&gate] { std::lock_guard<std::mutex> lk(gate); }, "blocked");
  const Event e = s->record();
  EXPECT_EQ(e.stream, s.get());
  EXPECT_EQ(e.seq, 1u);
  std::this_thread::sleep_for(milliseconds(10));
  EXPECT_FALSE(s->done(e));  // the item cannot finish while the host holds the gate
  gate.unlock();
  s->synchronize();
  EXPECT_TRUE(s->done(e));
  s->launch([] {}, "second");
  EXPECT_EQ(s->record().seq, 2u);
}

TEST(CpuStream, CrossStreamWaitOrdersWork) {
  auto a = make_cpu_stream("A", 0);
  auto b = make_cpu_stream("B", 1);
  int value = 0;  // written on A, read on B: only the wait orders them
  int seen = -1;
  a->launch(
      [&value] {
        std::this_thread::sleep_for(milliseconds(50));
        value = 1;
      },
      "produce");
  const Event e = a->record();
  b->wait(e);
  b->launch([&] { seen = value; }, "consume");
  b->synchronize();  // B alone: its wait must have held it until A's item finished
  EXPECT_EQ(seen, 1);
  EXPECT_TRUE(a->done(e));
  EXPECT_TRUE(b->done(e));  // another stream's event is answered by that stream
  a->synchronize();
}

TEST(CpuStream, WaitOnItsOwnOrInvalidEventIsANoOp) {
  auto s = make_cpu_stream("self", 0);
  int n = 0;
  s->launch([&n] { ++n; }, "one");
  s->wait(s->record());
  s->wait(Event{});
  s->launch([&n] { ++n; }, "two");
  s->synchronize();
  EXPECT_EQ(n, 2);
  EXPECT_EQ(s->record().seq, 2u);  // neither wait became an item
}

TEST(CpuStream, SynchronizeRethrowsAndSkipsLaterOpsUntilReported) {
  auto s = make_cpu_stream("fail", 0);
  auto other = make_cpu_stream("other", 1);
  bool ran_after = false;
  s->launch([] { throw std::runtime_error("boom"); }, "throws");
  s->launch([] { throw std::runtime_error("second"); }, "throws.too");
  s->launch([&ran_after] { ran_after = true; }, "after");
  // Another stream waiting on the failed stream must not deadlock.
  other->wait(s->record());
  other->launch([] {}, "waiter");
  other->synchronize();
  try {
    s->synchronize();
    FAIL() << "synchronize() did not rethrow";
  } catch (const std::runtime_error& e) {
    EXPECT_STREQ(e.what(), "boom");  // the first error, not the second
  }
  EXPECT_FALSE(ran_after);
  EXPECT_NO_THROW(s->synchronize());  // reported once, then cleared
  s->launch([&ran_after] { ran_after = true; }, "after.report");
  s->synchronize();
  EXPECT_TRUE(ran_after);
}

TEST(CpuStream, DestructorDrainsTheQueue) {
  int n = 0;  // read after join: ordered by the destructor
  {
    auto s = make_cpu_stream("drain", 0);
    for (int i = 0; i < 20; ++i) {
      s->launch(
          [&n] {
            std::this_thread::sleep_for(milliseconds(1));
            ++n;
          },
          "slow");
    }
  }
  EXPECT_EQ(n, 20);
}

TEST(CpuStream, WorkerThreadCarriesTheStreamName) {
#ifdef __linux__
  auto s = make_cpu_stream("a-long-stream-name", 0);
  char buf[32] = {};
  s->launch([&buf] { pthread_getname_np(pthread_self(), buf, sizeof buf); }, "name");
  s->synchronize();
  EXPECT_STREQ(buf, "a-long-stream-n");  // cut to Linux's 15 characters
#else
  GTEST_SKIP() << "thread names are checked on Linux only";
#endif
}

struct CollectingSink : TraceSink {
  std::mutex mu;
  std::vector<OpRecord> records;
  void on_op(const OpRecord& r) override {
    std::lock_guard<std::mutex> lk(mu);
    records.push_back(r);
  }
};

TEST(CpuStream, TraceSinkReceivesOneRecordPerOp) {
  auto a = make_cpu_stream("traced", 7);
  auto b = make_cpu_stream("untraced", 8);
  CollectingSink sink;
  a->set_trace_sink(&sink);
  a->launch([] { std::this_thread::sleep_for(milliseconds(2)); }, "fwd.qkv", 0);
  b->launch([] {}, "other.stream");
  a->wait(b->record());  // a wait is not an op: no record
  a->launch([] {}, "recompute.ln1", 5);
  a->launch([] {}, "no.block");
  a->synchronize();
  b->synchronize();
  a->set_trace_sink(nullptr);
  a->launch([] {}, "after.detach");
  a->synchronize();

  ASSERT_EQ(sink.records.size(), 3u);
  const char* labels[] = {"fwd.qkv", "recompute.ln1", "no.block"};
  const int blocks[] = {0, 5, -1};
  for (int i = 0; i < 3; ++i) {
    const OpRecord& r = sink.records[i];
    EXPECT_STREQ(r.label, labels[i]);
    EXPECT_EQ(r.block, blocks[i]);
    EXPECT_EQ(r.stream_id, 7);
    EXPECT_LE(r.start_ns, r.end_ns);
    if (i > 0) {
      EXPECT_GE(r.start_ns, sink.records[i - 1].end_ns);
    }
  }
  EXPECT_GE(sink.records[0].end_ns - sink.records[0].start_ns, 2'000'000);
}

TEST(NullStream, NeverRunsWorkAndEventsAreComplete) {
  auto s = make_null_stream("dry", 2);
  auto other = make_cpu_stream("real", 3);
  bool ran = false;
  s->launch([&ran] { ran = true; }, "dropped");
  const Event e1 = s->record();
  const Event e2 = s->record();
  EXPECT_TRUE(e1.valid());
  EXPECT_GT(e2.seq, e1.seq);
  EXPECT_TRUE(s->done(e1));
  s->wait(e1);
  s->synchronize();
  EXPECT_FALSE(ran);
  // A real stream may wait on a null stream's event without blocking forever.
  other->wait(e2);
  other->launch([] {}, "after.null");
  other->synchronize();
}

// ---------------------------------------------------------------- arena

constexpr size_t kA = Arena::kAlign;

Block take(Arena& a, size_t bytes, Stream* s = nullptr, Phase p = Phase::kForward,
           Usage u = Usage::kActivation, const char* name = "t") {
  return a.alloc(bytes, s, p, u, name);
}

TEST(Arena, RoundsUpAndPlacesAtTheTop) {
  Arena a(SIZE_MAX, nullptr);
  EXPECT_TRUE(a.dry_run());
  Block b0 = take(a, 0);
  Block b1 = take(a, 1);
  Block b2 = take(a, kA + 1);
  EXPECT_EQ(b0.offset, 0u);
  EXPECT_EQ(b0.bytes, kA);
  EXPECT_EQ(b1.offset, kA);
  EXPECT_EQ(b1.bytes, kA);
  EXPECT_EQ(b2.offset, 2 * kA);
  EXPECT_EQ(b2.bytes, 2 * kA);
  EXPECT_EQ(b2.ptr, nullptr);
  EXPECT_EQ(a.stats().extent_peak, 4 * kA);
  a.free(b1, nullptr);
  EXPECT_FALSE(b1.valid());
}

TEST(Arena, RealArenaPointsIntoOneAlignedReservation) {
  Arena a(16 * kA, cpu_memory());
  EXPECT_FALSE(a.dry_run());
  Block x = take(a, 100);
  Block y = take(a, 300);
  ASSERT_NE(x.ptr, nullptr);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(x.ptr) % kA, 0u);
  EXPECT_EQ(static_cast<char*>(y.ptr) - static_cast<char*>(x.ptr),
            static_cast<std::ptrdiff_t>(y.offset - x.offset));
  std::memset(y.ptr, 0, y.bytes);  // the bytes are really there (ASan would see otherwise)
  a.free(x, nullptr);
  a.free(y, nullptr);
}

TEST(Arena, BestFitPicksTheSmallestRegionThenTheLowestOffset) {
  Arena a(SIZE_MAX, nullptr);
  Block r1 = take(a, 4 * kA);  // [0, 4)
  Block k1 = take(a, kA);      // [4, 5) keeps regions apart
  Block r2 = take(a, 2 * kA);  // [5, 7)
  Block k2 = take(a, kA);      // [7, 8)
  Block r3 = take(a, 8 * kA);  // [8, 16)
  Block k3 = take(a, kA);      // [16, 17)
  Block r4 = take(a, 2 * kA);  // [17, 19)
  Block k4 = take(a, kA);      // [19, 20) so r4 is not the tail
  a.free(r1, nullptr);
  a.free(r2, nullptr);
  a.free(r3, nullptr);
  a.free(r4, nullptr);
  const size_t top = a.stats().extent_peak;

  Block x = take(a, 2 * kA);  // two 2-block regions: the lower one
  EXPECT_EQ(x.offset, 5 * kA);
  Block y = take(a, 3 * kA);  // smallest that holds 3 blocks: [0, 4)
  EXPECT_EQ(y.offset, 0u);
  Block z = take(a, kA);  // left-overs: [3, 4) (1 block) beats [17, 19)
  EXPECT_EQ(z.offset, 3 * kA);
  Block w = take(a, 5 * kA);  // only [8, 16) holds it; its rest stays free
  EXPECT_EQ(w.offset, 8 * kA);
  Block v = take(a, 3 * kA);
  EXPECT_EQ(v.offset, 13 * kA);
  EXPECT_EQ(a.stats().extent_peak, top);  // nothing came from the top
  for (Block* b : {&k1, &k2, &k3, &k4, &x, &y, &z, &w, &v}) a.free(*b, nullptr);
}

TEST(Arena, FreedNeighboursCoalesce) {
  Arena a(SIZE_MAX, nullptr);
  Block b0 = take(a, kA);
  Block b1 = take(a, 2 * kA);
  Block b2 = take(a, kA);
  Block guard = take(a, kA);
  a.free(b0, nullptr);
  a.free(b2, nullptr);
  a.free(b1, nullptr);  // joins both neighbours: one 4-block region at 0
  Block big = take(a, 4 * kA);
  EXPECT_EQ(big.offset, 0u);
  EXPECT_EQ(a.stats().extent_peak, 5 * kA);
  a.free(big, nullptr);
  a.free(guard, nullptr);  // now everything is one free region ending at the top
  Block all = take(a, 5 * kA);
  EXPECT_EQ(all.offset, 0u);
  EXPECT_EQ(a.stats().extent_peak, 5 * kA);
}

TEST(Arena, FreeTailGrowsIntoTheTop) {
  Arena a(SIZE_MAX, nullptr);
  Block b0 = take(a, kA);
  Block b1 = take(a, kA);
  a.free(b1, nullptr);
  Block big = take(a, 3 * kA);  // reuses the free tail [1, 2) and extends it
  EXPECT_EQ(big.offset, kA);
  EXPECT_EQ(a.stats().extent_peak, 4 * kA);
  a.free(b0, nullptr);
  a.free(big, nullptr);
}

TEST(Arena, OverflowThrowsNamingTheTensor) {
  for (MemoryResource* mem : {static_cast<MemoryResource*>(nullptr), cpu_memory()}) {
    Arena a(8 * kA, mem);
    Block b = take(a, 6 * kA);
    Block c = take(a, 2 * kA);  // exactly full
    EXPECT_EQ(c.offset + c.bytes, 8 * kA);
    try {
      take(a, 1, nullptr, Phase::kBackward, Usage::kWorkspace, "blocks.3.attn_out");
      FAIL() << "no throw";
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("blocks.3.attn_out"), std::string::npos) << msg;
      EXPECT_NE(msg.find(std::to_string(8 * kA)), std::string::npos) << msg;  // capacity
    }
    a.free(c, nullptr);
    EXPECT_THROW(take(a, 3 * kA), Error);  // 2 free blocks at the tail + no top left
    EXPECT_EQ(take(a, 2 * kA).offset, 6 * kA);
    EXPECT_EQ(a.stats().allocs, 3u);  // failed requests change nothing
    a.free(b, nullptr);
  }
}

TEST(Arena, DoubleFreeAndForeignBlocksThrow) {
  Arena a(SIZE_MAX, nullptr);
  Block b = take(a, kA);
  Block keep = take(a, kA);
  Block copy = b;
  a.free(b, nullptr);
  EXPECT_THROW(a.free(b, nullptr), Error);     // invalid after free
  EXPECT_THROW(a.free(copy, nullptr), Error);  // same bytes again
  Block foreign;
  foreign.offset = 64 * kA;
  foreign.bytes = kA;
  EXPECT_THROW(a.free(foreign, nullptr), Error);
  a.free(keep, nullptr);
}

TEST(Arena, PeaksByPhaseAndUsage) {
  Arena a(SIZE_MAX, nullptr);
  Block f1 = take(a, 4 * kA, nullptr, Phase::kForward, Usage::kActivation);
  Block f2 = take(a, 2 * kA, nullptr, Phase::kForward, Usage::kWorkspace);
  a.free(f2, nullptr);
  Block f3 = take(a, kA, nullptr, Phase::kForward, Usage::kActivation);
  // forward: live 4, 6, (4), 5 -> peak 6; activations 4, 4, 5 -> 5
  Block r1 = take(a, 3 * kA, nullptr, Phase::kRecompute, Usage::kActivation);
  // recompute: live 8, activations 8
  a.free(f1, nullptr);
  Block b1 = take(a, 2 * kA, nullptr, Phase::kBackward, Usage::kWorkspace);
  Block b2 = take(a, 3 * kA, nullptr, Phase::kBackward, Usage::kWorkspace);
  // backward: live 4 (-> 6, 9); activations 4
  const ArenaStats& s = a.stats();
  EXPECT_EQ(s.live_bytes, 9 * kA);
  EXPECT_EQ(s.peak_bytes, 9 * kA);
  EXPECT_EQ(s.live_by_usage[0], 4 * kA);
  EXPECT_EQ(s.live_by_usage[1], 5 * kA);
  EXPECT_EQ(s.peak_by_usage[0], 8 * kA);
  EXPECT_EQ(s.peak_by_usage[1], 5 * kA);
  EXPECT_EQ(s.peak_in_phase[0], 6 * kA);
  EXPECT_EQ(s.peak_in_phase[1], 9 * kA);
  EXPECT_EQ(s.peak_in_phase[2], 8 * kA);
  EXPECT_EQ(s.peak_in_phase[3], 0u);
  EXPECT_EQ(s.activation_peak_in_phase[0], 5 * kA);
  EXPECT_EQ(s.activation_peak_in_phase[1], 4 * kA);
  EXPECT_EQ(s.activation_peak_in_phase[2], 8 * kA);
  EXPECT_EQ(s.allocs, 6u);
  EXPECT_EQ(s.frees, 2u);

  a.free(b2, nullptr);
  a.reset_peaks();  // live now: 6 blocks, 4 of them activations
  EXPECT_EQ(s.peak_bytes, 6 * kA);
  EXPECT_EQ(s.peak_by_usage[0], 4 * kA);
  EXPECT_EQ(s.peak_by_usage[1], 2 * kA);
  for (int p = 0; p < kNumPhases; ++p) {
    EXPECT_EQ(s.peak_in_phase[p], 6 * kA);
    EXPECT_EQ(s.activation_peak_in_phase[p], 4 * kA);
  }
  EXPECT_EQ(s.extent_peak, 11 * kA);  // not a live value: kept
  Block o = take(a, kA, nullptr, Phase::kOther, Usage::kActivation);
  EXPECT_EQ(s.peak_in_phase[3], 7 * kA);
  EXPECT_EQ(s.activation_peak_in_phase[3], 5 * kA);
  EXPECT_EQ(s.peak_in_phase[0], 6 * kA);
  for (Block* b : {&f3, &r1, &b1, &o}) a.free(*b, nullptr);
  EXPECT_EQ(s.live_bytes, 0u);
  EXPECT_STREQ(phase_name(Phase::kRecompute), "recompute");
}

TEST(Arena, LiveHookSeesEveryChange) {
  Arena a(SIZE_MAX, nullptr);
  std::vector<std::pair<size_t, size_t>> calls;
  a.set_live_hook(
      [](void* ctx, size_t live, size_t act) {
        static_cast<std::vector<std::pair<size_t, size_t>>*>(ctx)->emplace_back(live, act);
      },
      &calls);
  Block x = take(a, kA, nullptr, Phase::kForward, Usage::kActivation);
  Block y = take(a, 2 * kA, nullptr, Phase::kForward, Usage::kWorkspace);
  a.free(x, nullptr);
  a.set_live_hook(nullptr, nullptr);
  a.free(y, nullptr);
  const std::vector<std::pair<size_t, size_t>> want = {{kA, kA}, {3 * kA, kA}, {2 * kA, 0}};
  EXPECT_EQ(calls, want);
}

TEST(Arena, SameStreamReuseNeedsNoWait) {
  auto s = make_cpu_stream("s", 0);
  Arena a(SIZE_MAX, nullptr);
  Block b = take(a, kA, s.get());
  a.free(b, s.get());
  Block c = take(a, kA, s.get());
  EXPECT_EQ(c.offset, 0u);
  EXPECT_EQ(a.stats().cross_stream_waits, 0u);
  EXPECT_EQ(s->record().seq, 0u);  // no wait item was queued either
  Block d = take(a, kA, nullptr);  // no stream: nothing to wait with
  a.free(c, s.get());
  a.free(d, nullptr);
  Block e = take(a, 2 * kA, nullptr);
  EXPECT_EQ(a.stats().cross_stream_waits, 0u);
  a.free(e, nullptr);
}

// A writes to a block and frees it; B reuses the bytes: B must see A's work (and A's poison
// fill, in poisoning builds) finished.
TEST(Arena, CrossStreamReuseWaitsForTheFreeingStream) {
  auto sa = make_cpu_stream("A", 0);
  auto sb = make_cpu_stream("B", 1);
  Arena a(4 * kA, cpu_memory());
  Block blk = take(a, kA, sa.get());
  float* pa = blk.f32();
  pa[0] = 0.0f;  // host write, ordered before A's item by launch()
  sa->launch(
      [pa] {
        std::this_thread::sleep_for(milliseconds(50));
        pa[0] = 1.0f;
      },
      "write.one");
  a.free(blk, sa.get());
  Block again = take(a, kA, sb.get());
  ASSERT_EQ(again.offset, 0u);
  EXPECT_EQ(a.stats().cross_stream_waits, 1u);
  float seen = -1.0f;
  float* pb = again.f32();
  sb->launch(
      [pb, &seen] {
        seen = pb[0];
        pb[0] = 2.0f;
      },
      "read.write");
  sb->synchronize();
#ifdef REMAT_POISON_FREED
  EXPECT_TRUE(std::isnan(seen)) << seen;  // A's poison ran after its write, before B
#else
  EXPECT_EQ(seen, 1.0f);
#endif
  EXPECT_EQ(pb[0], 2.0f);
  a.free(again, sb.get());
  sa->synchronize();
  sb->synchronize();
}

TEST(Arena, PoisonedFreedMemoryReadsNaN) {
#ifdef REMAT_POISON_FREED
  auto s = make_cpu_stream("poison", 0);
  Arena a(16 * kA, cpu_memory());
  Block keep = take(a, kA, s.get());
  Block b = take(a, 3 * kA + 8, s.get());
  Block h = take(a, kA, nullptr);
  float* p = b.f32();
  float* q = h.f32();
  const size_t n = b.bytes / sizeof(float);
  for (size_t i = 0; i < n; ++i) p[i] = 1.0f;
  keep.f32()[0] = 5.0f;
  q[0] = 3.0f;
  CollectingSink sink;
  s->set_trace_sink(&sink);
  a.free(b, s.get());
  s->synchronize();
  s->set_trace_sink(nullptr);
  for (size_t i = 0; i < n; ++i) ASSERT_TRUE(std::isnan(p[i])) << i;
  EXPECT_EQ(keep.f32()[0], 5.0f);  // neighbours untouched
  ASSERT_EQ(sink.records.size(), 1u);
  EXPECT_STREQ(sink.records[0].label, "poison");
  a.free(h, nullptr);  // no stream: poisoned at once
  EXPECT_TRUE(std::isnan(q[0]));
  a.free(keep, s.get());
  s->synchronize();
#else
  GTEST_SKIP() << "built without REMAT_POISON_FREED (Release)";
#endif
}

// The same random alloc/free sequence on a dry arena (null streams) and a real one (CPU
// streams) gives the same offsets and statistics; the dry extent is exactly enough.
TEST(Arena, DryRunPredictsTheRealRun) {
  struct Op {
    bool alloc;
    size_t bytes_or_index;
    int stream;
    Phase phase;
    Usage usage;
  };
  std::mt19937 rng(20240611);
  std::vector<Op> ops;
  size_t live = 0;
  for (int i = 0; i < 1000; ++i) {
    const bool alloc = live == 0 || std::uniform_int_distribution<int>(0, 99)(rng) < 55;
    const size_t what = alloc ? std::uniform_int_distribution<size_t>(0, 40 * kA)(rng)
                              : std::uniform_int_distribution<size_t>(0, live - 1)(rng);
    const int stream = std::uniform_int_distribution<int>(0, 1)(rng);  // allocs only
    const Phase phase = static_cast<Phase>(std::uniform_int_distribution<int>(0, 3)(rng));
    const Usage usage = static_cast<Usage>(std::uniform_int_distribution<int>(0, 1)(rng));
    ops.push_back(Op{alloc, what, stream, phase, usage});
    if (alloc) {
      ++live;
    } else {
      --live;
    }
  }

  // Each block is freed on the stream that allocated and used it (its last user).
  auto replay = [&ops](Arena& arena, Stream* s0, Stream* s1) {
    Stream* streams[2] = {s0, s1};
    std::vector<std::pair<Block, Stream*>> blocks;  // live blocks, in allocation order
    std::vector<size_t> offsets;
    for (const Op& op : ops) {
      if (op.alloc) {
        Stream* s = streams[op.stream];
        const Block b = arena.alloc(op.bytes_or_index, s, op.phase, op.usage, "rand");
        blocks.emplace_back(b, s);
        offsets.push_back(b.offset);
        if (!arena.dry_run()) {
          float* p = b.f32();
          s->launch([p] { p[0] = 1.0f; }, "touch");  // real work on the real bytes
        }
      } else {
        auto it = blocks.begin() + static_cast<std::ptrdiff_t>(op.bytes_or_index);
        arena.free(it->first, it->second);
        blocks.erase(it);
      }
    }
    for (auto& [b, s] : blocks) arena.free(b, s);
    return offsets;
  };

  auto n0 = make_null_stream("dry0", 0);
  auto n1 = make_null_stream("dry1", 1);
  Arena dry(SIZE_MAX, nullptr);
  const std::vector<size_t> dry_offsets = replay(dry, n0.get(), n1.get());

  auto c0 = make_cpu_stream("real0", 0);
  auto c1 = make_cpu_stream("real1", 1);
  Arena real(dry.stats().extent_peak, cpu_memory());  // the prediction must suffice
  const std::vector<size_t> real_offsets = replay(real, c0.get(), c1.get());
  c0->synchronize();
  c1->synchronize();

  EXPECT_EQ(dry_offsets, real_offsets);
  const ArenaStats& d = dry.stats();
  const ArenaStats& r = real.stats();
  EXPECT_GT(d.cross_stream_waits, 0u);
  EXPECT_EQ(d.cross_stream_waits, r.cross_stream_waits);
  EXPECT_EQ(d.peak_bytes, r.peak_bytes);
  EXPECT_EQ(d.peak_by_usage, r.peak_by_usage);
  EXPECT_EQ(d.peak_in_phase, r.peak_in_phase);
  EXPECT_EQ(d.activation_peak_in_phase, r.activation_peak_in_phase);
  EXPECT_EQ(d.extent_peak, r.extent_peak);
  EXPECT_EQ(d.allocs, r.allocs);
  EXPECT_EQ(r.live_bytes, 0u);
  // Reuse keeps the extent well under the sum of all requests.
  EXPECT_LT(d.extent_peak, 2 * d.peak_bytes);
}

}  // namespace
}  // namespace remat
