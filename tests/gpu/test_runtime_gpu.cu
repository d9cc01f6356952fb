// The CUDA runtime pieces: CudaStream (events, cross-stream waits, recycling, tracing) and the
// activation arena over the CUDA memory resource. Tests skip without a device, saying so.
//
// Ordering tests use a kernel that spins for a while before writing: without the wait under
// test, the consumer would read the old value.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels/cuda_common.cuh"
#include "runtime/arena.h"
#include "runtime/cuda/cuda_memory.h"
#include "runtime/cuda/cuda_stream.h"

namespace remat {
namespace {

bool cuda_device_present() {
  static const bool present = [] {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError();
      return false;
    }
    return n > 0;
  }();
  return present;
}

#define REMAT_REQUIRE_GPU()                                                         \
  do {                                                                              \
    if (!cuda_device_present()) GTEST_SKIP() << "no CUDA device: GPU test skipped"; \
  } while (0)

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
