// The CUDA memory resource (runtime/cuda/cuda_memory.h).
#include "runtime/cuda/cuda_memory.h"

#include <algorithm>
#include <cstdio>

#include "kernels/cuda_common.cuh"

namespace remat {
namespace {

class CudaMemory final : public MemoryResource {
 public:
  // One cudaMalloc of at least `bytes` (256-byte aligned, as cudaMalloc guarantees).
  void* reserve(size_t bytes) override {
    void* p = nullptr;
    REMAT_CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(bytes, 256)));
    return p;
  }

  // Never throws (called from destructors); a failure is reported on stderr.
  void release(void* p) override {
    if (p == nullptr) return;
    const cudaError_t err = cudaFree(p);
    if (err != cudaSuccess)
      std::fprintf(stderr, "remat: cudaFree failed: %s\n", cudaGetErrorString(err));
  }

  // 0xFF bytes: NaN in fp32 and in bf16. As work on `stream` (label "poison"), after its
  // last use there; with no stream, at once, ordered as Backend::upload is: the legacy stream's
  // memset does not synchronize with remat's non-blocking streams, so the device is
  // synchronized before (no kernel still uses the block) and after (none sees it unfilled).
  void poison(void* p, size_t bytes, Stream* stream) override {
    if (stream == nullptr) {
      REMAT_CUDA_CHECK(cudaDeviceSynchronize());
      REMAT_CUDA_CHECK(cudaMemset(p, 0xFF, bytes));
      REMAT_CUDA_CHECK(cudaDeviceSynchronize());
      return;
    }
    auto s = static_cast<cudaStream_t>(stream->native());
    REMAT_CHECK(s != nullptr,
                "cuda_memory: poison needs a CUDA stream, got '" + stream->name() + "'");
    stream->launch([p, bytes, s] { REMAT_CUDA_CHECK(cudaMemsetAsync(p, 0xFF, bytes, s)); },
                   "poison");
  }
};

}  // namespace

MemoryResource* cuda_memory() {
  static CudaMemory memory;
  return &memory;
}

}  // namespace remat
