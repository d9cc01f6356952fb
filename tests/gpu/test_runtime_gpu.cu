// The CUDA runtime pieces: CudaStream (events, cross-stream waits, recycling, synchronize
// racing a record, tracing through CUPTI and through cudaEvents, wait records the Tracer
// resolves), the activation arena over the CUDA memory resource, and the backend's ordering of
// downloads and ownership of cuBLASLt workspaces. Tests skip without a device, saying so.
//
// Ordering tests use a kernel that spins for a while before writing: without the wait under
// test, the consumer would read the old value.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda_common.cuh"
#include "kernels/matmul.h"
#include "profiling/overlap.h"
#include "profiling/tracer.h"
#include "runtime/arena.h"
#include "runtime/cuda/cuda_backend.h"
#include "runtime/cuda/cuda_memory.h"
#include "runtime/cuda/cuda_stream.h"
#include "runtime/cuda/cupti_trace.h"
#include "tests/gpu/require_gpu.h"

namespace remat {
namespace {

using test::cuda_device_present;

// Spins for about `ns` nanoseconds, then writes *dst = value.
__global__ void spin_then_write(int* dst, int value, long long ns) {
  const long long start = clock64();
  const long long cycles = ns;  // >= ns at clock rates >= 1 GHz
  while (clock64() - start < cycles) __nanosleep(1000);
  *dst = value;
}

__global__ void copy_int(int* dst, const int* src) {
  *dst = *src;
}

cudaStream_t native(Stream& s) {
  return static_cast<cudaStream_t>(s.native());
}

constexpr long long kSpinNs = 200'000'000;  // 0.2 s at >= 1 GHz

TEST(CudaStream, WaitOrdersWorkAcrossStreams) {
  REMAT_REQUIRE_GPU();
  auto producer = make_cuda_stream("producer", 1);
  auto consumer = make_cuda_stream("consumer", 2);
  int *flag, *seen;
  REMAT_CUDA_CHECK(cudaMalloc(&flag, sizeof(int)));
  REMAT_CUDA_CHECK(cudaMalloc(&seen, sizeof(int)));
  REMAT_CUDA_CHECK(cudaMemset(flag, 0, sizeof(int)));
  REMAT_CUDA_CHECK(cudaMemset(seen, 0, sizeof(int)));
  REMAT_CUDA_CHECK(cudaDeviceSynchronize());

  producer->launch([&] { spin_then_write<<<1, 1, 0, native(*producer)>>>(flag, 42, kSpinNs); },
                   "spin");
  const Event e = producer->record();
  EXPECT_TRUE(e.valid());
  EXPECT_EQ(e.stream, producer.get());
  EXPECT_FALSE(producer->done(e)) << "the spinning kernel cannot have finished yet";
  consumer->wait(e);
  consumer->launch([&] { copy_int<<<1, 1, 0, native(*consumer)>>>(seen, flag); }, "copy");
  consumer->synchronize();
  int h = 0;
  REMAT_CUDA_CHECK(cudaMemcpy(&h, seen, sizeof(int), cudaMemcpyDeviceToHost));
  EXPECT_EQ(h, 42) << "consumer ran before the producer's event";
  EXPECT_TRUE(producer->done(e));  // the consumer waited for it
  producer->synchronize();
  EXPECT_TRUE(producer->done(e));
  cudaFree(flag);
  cudaFree(seen);
}

TEST(CudaStream, EventsIncreaseDefaultEventIsCompleteAndOwnWaitIsNoop) {
  REMAT_REQUIRE_GPU();
  auto s = make_cuda_stream("events", 7);
  EXPECT_EQ(s->id(), 7);
  EXPECT_EQ(s->name(), "events");
  EXPECT_NE(s->native(), nullptr);
  EXPECT_TRUE(s->done(Event{}));
  s->wait(Event{});
  const Event a = s->record(), b = s->record();
  EXPECT_LT(a.seq, b.seq);
  s->wait(a);  // own stream: already ordered
  s->synchronize();
  EXPECT_TRUE(s->done(a));
  EXPECT_TRUE(s->done(b));
}

TEST(CudaStream, ManyEventsAreRecycledAndStayCorrect) {
  REMAT_REQUIRE_GPU();
  auto s = make_cuda_stream("many", 3);
  auto t = make_cuda_stream("waiter", 4);
  int* x;
  REMAT_CUDA_CHECK(cudaMalloc(&x, sizeof(int)));
  std::vector<Event> events;
  for (int i = 0; i < 2000; ++i) {
    s->launch([&, i] { spin_then_write<<<1, 1, 0, native(*s)>>>(x, i, 1000); }, "tick");
    events.push_back(s->record());
    if (i % 100 == 0) t->wait(events.back());
  }
  t->synchronize();
  s->synchronize();
  for (const Event& e : events) EXPECT_TRUE(s->done(e));
  int h = -1;
  REMAT_CUDA_CHECK(cudaMemcpy(&h, x, sizeof(int), cudaMemcpyDeviceToHost));
  EXPECT_EQ(h, 1999);
  cudaFree(x);
}

TEST(CudaStream, LaunchRethrowsAndTraceSinkGetsOneRecordPerOp) {
  REMAT_REQUIRE_GPU();
  auto s = make_cuda_stream("traced", 5);
  EXPECT_THROW(s->launch([] { throw Error("boom"); }, "throws"), Error);

  struct Sink : TraceSink {
    std::vector<OpRecord> records;
    void on_op(const OpRecord& r) override { records.push_back(r); }
  } sink;
  int* x;
  REMAT_CUDA_CHECK(cudaMalloc(&x, sizeof(int)));
  s->synchronize();
  s->set_trace_sink(&sink);
  for (int i = 0; i < 3; ++i)
    s->launch([&] { spin_then_write<<<1, 1, 0, native(*s)>>>(x, 1, 100000); }, "op", i);
  s->synchronize();
  s->set_trace_sink(nullptr);
  ASSERT_EQ(sink.records.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    EXPECT_STREQ(sink.records[i].label, "op");
    EXPECT_EQ(sink.records[i].block, i);
    EXPECT_EQ(sink.records[i].stream_id, 5);
    EXPECT_LE(sink.records[i].start_ns, sink.records[i].end_ns);
    if (i > 0) EXPECT_LE(sink.records[i - 1].end_ns, sink.records[i].start_ns + 1000);
  }
  cudaFree(x);
}

// Records from any thread.
struct CollectingSink : TraceSink {
  std::mutex mu;
  std::vector<OpRecord> records;
  void on_op(const OpRecord& r) override {
    std::lock_guard<std::mutex> lk(mu);
    records.push_back(r);
  }
};

enum class Timing { kCupti, kEvents };

// Six labelled ops alternating between two traced streams, the last two enqueuing two kernels
// each; checks each op's records: label, block, stream, start < end, and inside the host window
// from just before its launch() to just after both synchronize() calls. CUPTI gives one record
// per kernel, cudaEvents one per op. Skips when `timing` is CUPTI and CUPTI cannot be used here.
void check_two_stream_trace(Timing timing) {
  constexpr int64_t kSlackNs = 1'000'000;  // host/GPU clock mapping error allowed
  static const char* const kLabels[] = {"fwd.spin", "recompute.spin", "bwd.spin"};
  auto a = make_cuda_stream("traced-a", 11);
  auto b = make_cuda_stream("traced-b", 12);
  int* x;  // (2) one word per stream
  REMAT_CUDA_CHECK(cudaMalloc(&x, 2 * sizeof(int)));
  CollectingSink sink_a, sink_b;
  if (timing == Timing::kEvents) setenv("REMAT_CUPTI", "0", 1);
  a->set_trace_sink(&sink_a);
  b->set_trace_sink(&sink_b);
  unsetenv("REMAT_CUPTI");
  const int cupti_streams = cupti_trace_attached_streams();
  if (timing == Timing::kCupti && cupti_streams < 2) {
    a->set_trace_sink(nullptr);
    b->set_trace_sink(nullptr);
    cudaFree(x);
    GTEST_SKIP() << "CUPTI cannot be used here (stderr says why): cudaEvent timing instead";
  }
  if (timing == Timing::kEvents) ASSERT_EQ(cupti_streams, 0);

  struct Launch {
    Stream* stream;
    const char* label;
    int block;
    int kernels;
    int64_t host_ns;  // steady clock just before launch()
  };
  std::vector<Launch> launches;
  for (int i = 0; i < 6; ++i) {
    Stream* s = i % 2 ? b.get() : a.get();
    int* dst = x + i % 2;
    const int kernels = i >= 4 ? 2 : 1;
    launches.push_back(Launch{s, kLabels[i % 3], i, kernels, steady_now_ns()});
    s->launch(
        [s, dst, kernels, i] {
          for (int k = 0; k < kernels; ++k)
            spin_then_write<<<1, 1, 0, native(*s)>>>(dst, i, 200'000);
          REMAT_CUDA_CHECK(cudaGetLastError());
        },
        kLabels[i % 3], i);
  }
  a->synchronize();
  b->synchronize();
  const int64_t done_ns = steady_now_ns();
  a->set_trace_sink(nullptr);
  b->set_trace_sink(nullptr);
  EXPECT_EQ(cupti_trace_attached_streams(), 0);

  size_t expected_a = 0, expected_b = 0;
  for (const Launch& l : launches) {
    CollectingSink& sink = l.stream == a.get() ? sink_a : sink_b;
    const size_t want = timing == Timing::kCupti ? l.kernels : 1;
    (l.stream == a.get() ? expected_a : expected_b) += want;
    size_t got = 0;
    for (const OpRecord& r : sink.records) {
      if (r.block != l.block) continue;
      ++got;
      EXPECT_STREQ(r.label, l.label) << "block " << l.block;
      EXPECT_EQ(r.stream_id, l.stream->id()) << "block " << l.block;
      EXPECT_LT(r.start_ns, r.end_ns) << "block " << l.block;
      EXPECT_GE(r.start_ns, l.host_ns - kSlackNs) << "block " << l.block << " ran before launch";
      EXPECT_LE(r.end_ns, done_ns + kSlackNs) << "block " << l.block << " ended after sync";
    }
    EXPECT_EQ(got, want) << "records of block " << l.block;
  }
  EXPECT_EQ(sink_a.records.size(), expected_a);
  EXPECT_EQ(sink_b.records.size(), expected_b);
  cudaFree(x);
}

TEST(CudaStreamTrace, CuptiRecordsCarryLabelBlockAndStreamOfEachKernel) {
  REMAT_REQUIRE_GPU();
  check_two_stream_trace(Timing::kCupti);
}

TEST(CudaStreamTrace, EventFallbackGivesOneRecordPerOp) {
  REMAT_REQUIRE_GPU();
  check_two_stream_trace(Timing::kEvents);
}

// The main stream waits on a side event behind a long spin while the main stream itself has
// run only short ops: the Tracer must resolve that wait to about the spin's remaining time (the
// overlap report's exposed recompute), and every op must carry its seq and launch time.
// Skips when `timing` is CUPTI and CUPTI cannot be used here.
void check_traced_wait(Timing timing) {
  constexpr int64_t kSlackNs = 1'000'000;  // host/GPU clock mapping error allowed
  constexpr long long kSideSpinNs = 50'000'000;
  auto main_s = make_cuda_stream("main", 0);
  auto side_s = make_cuda_stream("side", 1);
  int* x;  // (2) one word per stream
  REMAT_CUDA_CHECK(cudaMalloc(&x, 2 * sizeof(int)));
  REMAT_CUDA_CHECK(cudaMemset(x, 0, 2 * sizeof(int)));
  // Warm up (lazy module loading), so the traced launches below are quick on the host.
  spin_then_write<<<1, 1>>>(x, 0, 1000);
  copy_int<<<1, 1>>>(x, x + 1);
  REMAT_CUDA_CHECK(cudaGetLastError());
  REMAT_CUDA_CHECK(cudaDeviceSynchronize());
  {
    Tracer tracer;  // after the streams: detaches before they go
    if (timing == Timing::kEvents) setenv("REMAT_CUPTI", "0", 1);
    tracer.attach(main_s.get());
    tracer.attach(side_s.get());
    unsetenv("REMAT_CUPTI");
    const int cupti_streams = cupti_trace_attached_streams();
    if (timing == Timing::kCupti && cupti_streams < 2) {
      tracer.detach();
      cudaFree(x);
      GTEST_SKIP() << "CUPTI cannot be used here (stderr says why): cudaEvent timing instead";
    }
    if (timing == Timing::kEvents) ASSERT_EQ(cupti_streams, 0);

    Stream* m = main_s.get();
    Stream* s = side_s.get();
    const int64_t t_begin = steady_now_ns();
    m->launch([&] { spin_then_write<<<1, 1, 0, native(*m)>>>(x, 1, 1'000'000); }, "fwd.a", 0);
    s->launch([&] { spin_then_write<<<1, 1, 0, native(*s)>>>(x + 1, 2, kSideSpinNs); },
              "recompute.spin", 1);
    const Event e = s->record();
    m->launch([&] { spin_then_write<<<1, 1, 0, native(*m)>>>(x, 3, 1'000'000); }, "fwd.b", 0);
    m->wait(e);
    m->launch([&] { copy_int<<<1, 1, 0, native(*m)>>>(x, x + 1); }, "bwd.copy", 1);
    m->synchronize();
    s->synchronize();
    tracer.detach();

    const TraceData d = tracer.data();
    const TraceRecord *spin = nullptr, *wait = nullptr, *fwd_b = nullptr, *copy = nullptr;
    for (const TraceRecord& r : d.records) {
      EXPECT_GT(r.seq, 0u) << r.op.label;
      EXPECT_GE(r.launch_ns, t_begin) << r.op.label;
      if (!r.is_wait()) EXPECT_LE(r.launch_ns, r.op.start_ns + kSlackNs) << r.op.label;
      const std::string label = r.op.label;
      if (label == "recompute.spin") spin = &r;
      if (label == "wait") wait = &r;
      if (label == "fwd.b") fwd_b = &r;
      if (label == "bwd.copy") copy = &r;
    }
    ASSERT_NE(spin, nullptr);
    ASSERT_NE(wait, nullptr);
    ASSERT_NE(fwd_b, nullptr);
    ASSERT_NE(copy, nullptr);
    EXPECT_EQ(spin->seq, 1u);
    EXPECT_EQ(fwd_b->seq, 2u);  // main: fwd.a 1, fwd.b 2, the wait 3, bwd.copy 4
    EXPECT_EQ(wait->seq, 3u);
    EXPECT_EQ(copy->seq, 4u);
    EXPECT_EQ(wait->op.stream_id, 0);
    EXPECT_EQ(wait->waited_stream, 1);
    EXPECT_EQ(wait->waited_seq, 1u);  // after the side stream's first item
    EXPECT_EQ(wait->op.block, 1);     // held back bwd.copy
    const int64_t spin_ns = spin->op.end_ns - spin->op.start_ns;
    const int64_t wait_ns = wait->op.end_ns - wait->op.start_ns;
    // The wait began when fwd.b ended (the host launched it long before), and ended when the
    // spin did; bwd.copy started right after.
    EXPECT_GE(wait->op.start_ns, fwd_b->op.end_ns);
    EXPECT_LE(wait->op.start_ns, std::max(fwd_b->op.end_ns, wait->launch_ns));
    EXPECT_NEAR(wait->op.end_ns, spin->op.end_ns, kSlackNs);
    EXPECT_LE(wait->op.end_ns, copy->op.start_ns);
    EXPECT_GT(wait_ns, spin_ns / 2) << "main ran two 1 ms ops beside a " << spin_ns << " ns spin";
    EXPECT_LE(wait_ns, spin_ns + kSlackNs);
    const OverlapReport rep = overlap_report(d, 0, 1);
    EXPECT_EQ(rep.exposed_waits, 1);
    EXPECT_NEAR(rep.exposed_recompute_ms, wait_ns / 1e6, 1e-6);
    int h = 0;
    REMAT_CUDA_CHECK(cudaMemcpy(&h, x, sizeof(int), cudaMemcpyDeviceToHost));
    EXPECT_EQ(h, 2) << "bwd.copy ran before the side spin's write";
  }
  cudaFree(x);
}

TEST(CudaStreamTrace, CuptiWaitIsResolvedToTheSideStreamsRemainingTime) {
  REMAT_REQUIRE_GPU();
  check_traced_wait(Timing::kCupti);
}

TEST(CudaStreamTrace, EventFallbackWaitIsResolvedToTheSideStreamsRemainingTime) {
  REMAT_REQUIRE_GPU();
  check_traced_wait(Timing::kEvents);
}

// An event another thread records while synchronize() waits may be behind work the wait did
// not cover: synchronize() must not call it complete. `raw` is recorded just before it, so
// "done(e) implies raw complete" holds for any correct stream, however the wait went.
TEST(CudaStream, SynchronizeRetiresOnlyEventsRecordedBeforeIt) {
  REMAT_REQUIRE_GPU();
  auto s = make_cuda_stream("sync", 8);
  int* x;
  REMAT_CUDA_CHECK(cudaMalloc(&x, 2 * sizeof(int)));
  cudaEvent_t raw;
  REMAT_CUDA_CHECK(cudaEventCreateWithFlags(&raw, cudaEventDisableTiming));
  s->launch([&] { spin_then_write<<<1, 1, 0, native(*s)>>>(x, 1, kSpinNs); }, "first");
  Event e;
  std::thread other([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // inside the wait below
    s->launch([&] { spin_then_write<<<1, 1, 0, native(*s)>>>(x + 1, 2, 5 * kSpinNs); }, "late");
    REMAT_CUDA_CHECK(cudaEventRecord(raw, native(*s)));
    e = s->record();
  });
  s->synchronize();
  other.join();
  const bool said_done = s->done(e);
  const bool raw_done = cudaEventQuery(raw) == cudaSuccess;
  EXPECT_TRUE(!said_done || raw_done) << "an event recorded during synchronize() was retired "
                                         "before its work completed";
  s->synchronize();
  EXPECT_TRUE(s->done(e));
  (void)cudaGetLastError();
  cudaEventDestroy(raw);
  cudaFree(x);
}

// Backend::download copies on the legacy stream: it must still see the last write of a kernel
// on one of remat's (non-blocking) streams.
TEST(CudaBackend, DownloadWaitsForWorkOnRematStreams) {
  REMAT_REQUIRE_GPU();
  auto backend = make_cuda_backend(ActDType::kFP32);
  auto s = backend->make_stream("main", 0);
  int* x = static_cast<int*>(backend->alloc(sizeof(int), "x"));
  s->launch([&] { spin_then_write<<<1, 1, 0, native(*s)>>>(x, 42, kSpinNs); }, "slow write");
  int h = 0;
  backend->download(&h, x, sizeof(int));
  EXPECT_EQ(h, 42) << "download ran before the stream's kernel finished";
  s->synchronize();
  backend->release(x);
}

// cuBLASLt workspaces belong to streams: destroying one backend (and its streams) must leave
// another backend's workspaces alone. The freed memory of the old scheme would be handed out
// again: canaries take it, and must stay untouched while the survivor's matmul (whose bias
// gradient writes its partials into the workspace) runs correctly.
TEST(CudaBackend, DestroyingOneBackendLeavesAnotherBackendsWorkspaces) {
  REMAT_REQUIRE_GPU();
  constexpr int N = 64, C = 96, OC = 128;
  const std::vector<float> inp = [] {
    std::vector<float> v(N * C);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i % 7) - 3.f;
    return v;
  }();
  const std::vector<float> w = [] {
    std::vector<float> v(OC * C);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i % 5) - 2.f;
    return v;
  }();
  const std::vector<float> dout = [] {
    std::vector<float> v(N * OC);
    for (size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>(i % 3) - 1.f;
    return v;
  }();
  struct Side {
    std::unique_ptr<Backend> backend;
    std::unique_ptr<Stream> stream;
    void *inp, *w, *dout, *dinp, *dw, *db;
  };
  auto make_side = [&](const char* name) {
    Side sd;
    sd.backend = make_cuda_backend(ActDType::kFP32);
    sd.stream = sd.backend->make_stream(name, 0);
    Backend& b = *sd.backend;
    sd.inp = b.alloc(inp.size() * 4, "inp");
    sd.w = b.alloc(w.size() * 4, "w");
    sd.dout = b.alloc(dout.size() * 4, "dout");
    sd.dinp = b.alloc(inp.size() * 4, "dinp");
    sd.dw = b.alloc(w.size() * 4, "dw");
    sd.db = b.alloc(OC * 4, "db");
    b.upload_elems(sd.inp, inp.data(), inp.size());
    b.upload_elems(sd.w, w.data(), w.size());
    b.upload_elems(sd.dout, dout.data(), dout.size());
    return sd;
  };
  auto backward = [&](Side& sd) {
    sd.backend->matmul_backward(sd.stream.get(), sd.dinp, sd.dw, sd.db, sd.dout, sd.inp, sd.w, N, C,
                                OC, "bwd", -1);
    sd.stream->synchronize();
  };
  auto release = [](Side& sd) {
    for (void* p : {sd.inp, sd.w, sd.dout, sd.dinp, sd.dw, sd.db}) sd.backend->release(p);
  };
  Side a = make_side("a"), b = make_side("b");
  backward(a);  // each stream now has its workspace
  backward(b);
  release(a);
  a.stream.reset();
  a.backend.reset();

  constexpr size_t kCanaryBytes = size_t(36) << 20;  // a workspace's size today (32 + 4 MiB)
  std::vector<void*> canaries;
  for (int i = 0; i < 4; ++i) {
    void* p = nullptr;
    if (cudaMalloc(&p, kCanaryBytes) != cudaSuccess) break;
    REMAT_CUDA_CHECK(cudaMemset(p, 0x5A, kCanaryBytes));
    canaries.push_back(p);
  }
  (void)cudaGetLastError();
  REMAT_CUDA_CHECK(cudaDeviceSynchronize());
  backward(b);  // dw and db accumulate: twice the single-run values now

  std::vector<float> dinp(inp.size()), dw(w.size()), db(OC);
  b.backend->download_elems(dinp.data(), b.dinp, dinp.size());
  b.backend->download_elems(dw.data(), b.dw, dw.size());
  b.backend->download_elems(db.data(), b.db, db.size());
  std::vector<float> rdinp(inp.size()), rdw(w.size(), 0.f), rdb(OC, 0.f);
  for (int run = 0; run < 2; ++run)
    cpu::matmul_backward(rdinp.data(), rdw.data(), rdb.data(), dout.data(), inp.data(), w.data(), N,
                         C, OC);
  // Small integers: every sum is exact in fp32, whatever the order.
  EXPECT_EQ(dinp, rdinp);
  EXPECT_EQ(dw, rdw);
  EXPECT_EQ(db, rdb);
  std::vector<unsigned char> h(kCanaryBytes);
  for (size_t i = 0; i < canaries.size(); ++i) {
    REMAT_CUDA_CHECK(cudaMemcpy(h.data(), canaries[i], kCanaryBytes, cudaMemcpyDeviceToHost));
    const bool intact = std::all_of(h.begin(), h.end(), [](unsigned char c) { return c == 0x5A; });
    EXPECT_TRUE(intact) << "canary " << i << " (memory freed with the other backend) was written";
    cudaFree(canaries[i]);
  }
  release(b);
}

TEST(CudaMemory, PoisonFillsNaNBytesOnTheStream) {
  REMAT_REQUIRE_GPU();
  auto s = make_cuda_stream("poison", 1);
  MemoryResource* mem = cuda_memory();
  void* p = mem->reserve(1000);
  ASSERT_NE(p, nullptr);
  REMAT_CUDA_CHECK(cudaMemset(p, 0, 1000));
  REMAT_CUDA_CHECK(cudaDeviceSynchronize());
  mem->poison(p, 1000, s.get());
  s->synchronize();
  std::vector<unsigned char> h(1000);
  REMAT_CUDA_CHECK(cudaMemcpy(h.data(), p, 1000, cudaMemcpyDeviceToHost));
  for (unsigned char c : h) ASSERT_EQ(c, 0xFF);
  mem->release(p);
}

TEST(CudaArena, ReuseAcrossStreamsWaitsForTheFreeingStream) {
  REMAT_REQUIRE_GPU();
  auto s1 = make_cuda_stream("main", 0);
  auto s2 = make_cuda_stream("side", 1);
  int* seen;
  REMAT_CUDA_CHECK(cudaMalloc(&seen, sizeof(int)));
  {
    Arena arena(1 << 20, cuda_memory());
    Block a = arena.alloc(4096, s1.get(), Phase::kForward, Usage::kActivation, "a");
    ASSERT_NE(a.ptr, nullptr);
    int* ap = static_cast<int*>(a.ptr);
    REMAT_CUDA_CHECK(cudaMemset(ap, 0, 4096));
    REMAT_CUDA_CHECK(cudaDeviceSynchronize());
    // Last use of a on s1: a slow write. Then free on s1 and reuse on s2.
    s1->launch([&] { spin_then_write<<<1, 1, 0, native(*s1)>>>(ap, 7, kSpinNs); }, "last use");
    arena.free(a, s1.get());
    Block b = arena.alloc(4096, s2.get(), Phase::kBackward, Usage::kActivation, "b");
    EXPECT_EQ(static_cast<int*>(b.ptr), ap) << "best fit should reuse the freed bytes";
    EXPECT_EQ(arena.stats().cross_stream_waits, 1u);
    int* bp = static_cast<int*>(b.ptr);
    s2->launch([&] { copy_int<<<1, 1, 0, native(*s2)>>>(seen, bp); }, "read");
    s2->synchronize();
    int h = 0;
    REMAT_CUDA_CHECK(cudaMemcpy(&h, seen, sizeof(int), cudaMemcpyDeviceToHost));
#ifdef REMAT_POISON_FREED
    EXPECT_EQ(static_cast<uint32_t>(h), 0xFFFFFFFFu) << "freed block should be poisoned";
#else
    EXPECT_EQ(h, 7) << "reuse on s2 ran before the last use on s1 finished";
#endif
    arena.free(b, s2.get());
    s1->synchronize();
    s2->synchronize();
    EXPECT_EQ(arena.stats().live_bytes, 0u);
  }
  cudaFree(seen);
}

}  // namespace
}  // namespace remat
