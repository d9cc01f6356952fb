// The CUDA memory resource for the activation arena (runtime/arena.h): one cudaMalloc per
// reservation, cudaFree on release, and poisoning as a cudaMemsetAsync of 0xFF bytes (NaN in
// fp32 and in bf16) enqueued on the freeing stream (with no freeing stream: synchronously,
// the device synchronized before and after).
#pragma once
#include "runtime/arena.h"

namespace remat {

// Process-wide device resource (reservations on the device current at reserve() time).
MemoryResource* cuda_memory();

}  // namespace remat
