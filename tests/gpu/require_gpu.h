// The GPU tests' one device check: a test that needs a device starts with REMAT_REQUIRE_GPU()
// and, without one, skips saying so (bench/gpu_check.sh counts that message).
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

namespace remat::test {

// True when the CUDA runtime finds at least one device (checked once per process).
inline bool cuda_device_present() {
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

}  // namespace remat::test

#define REMAT_REQUIRE_GPU()                                                                        \
  do {                                                                                             \
    if (!::remat::test::cuda_device_present()) GTEST_SKIP() << "no CUDA device: GPU test skipped"; \
  } while (0)
