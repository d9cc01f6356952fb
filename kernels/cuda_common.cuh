// Shared helpers of the CUDA backend: error checks, the debug-sync mode, NVTX ranges and
// bf16 helpers. Host parts compile with a plain C++ compiler too (runtime/cuda/*.cpp include
// this file); device parts are behind __CUDACC__.
//
// Error contract: every check macro throws remat::Error whose message names the failing
// statement, file:line and the library's error string, after printing the same to stderr
// (a thrown error inside a destructor or a worker would otherwise be lost).
//
// Debug mode: REMAT_CUDA_SYNC=1 in the environment makes REMAT_CUDA_LAUNCH_CHECK synchronize
// the stream after every launcher, so an asynchronous fault is reported by the op that
// caused it.
#pragma once
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>

#include "kernels/common.h"

namespace remat::cuda {

// Prints and throws the error of a failed check. `what` is the library's error string.
[[noreturn]] inline void fail(const char* library, const char* stmt, const char* file, int line,
                              const char* what) {
  std::string msg = std::string(library) + " error at " + file + ":" + std::to_string(line) + ": " +
                    stmt + ": " + (what ? what : "(no message)");
  int dev = -1;
  if (cudaGetDevice(&dev) == cudaSuccess) msg += " (device " + std::to_string(dev) + ")";
  std::fprintf(stderr, "remat: %s\n", msg.c_str());
  throw ::remat::Error(msg);
}

// cuBLAS(Lt) status names (cublasGetStatusString lives in libcublas, which is not linked).
inline const char* cublas_status_string(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS:
      return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED:
      return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE:
      return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR:
      return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED:
      return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR:
      return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED:
      return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_LICENSE_ERROR:
      return "CUBLAS_STATUS_LICENSE_ERROR";
    default:
      return "unknown cublasStatus_t";
  }
}

// True when REMAT_CUDA_SYNC=1 (read once per process).
inline bool debug_sync_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("REMAT_CUDA_SYNC");
    return v != nullptr && v[0] == '1';
  }();
  return enabled;
}

// Opens an NVTX range for the lifetime of the object (host side; the range covers the
// enqueue, and Nsight Systems projects it onto the GPU work it launched).
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  NvtxRange(const std::string& name, int index) {
    nvtxRangePushA((name + " " + std::to_string(index)).c_str());
  }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

inline int ceil_div(long a, long b) {
  return static_cast<int>((a + b - 1) / b);
}

}  // namespace remat::cuda

// ---- check macros: statement, file:line and the error string; each is one statement ----

#define REMAT_CUDA_CHECK(stmt)                                                                     \
  do {                                                                                             \
    const cudaError_t remat_cuda_err_ = (stmt);                                                    \
    if (remat_cuda_err_ != cudaSuccess)                                                            \
      ::remat::cuda::fail("CUDA", #stmt, __FILE__, __LINE__, cudaGetErrorString(remat_cuda_err_)); \
  } while (0)

#define REMAT_CUBLAS_CHECK(stmt)                                                  \
  do {                                                                            \
    const cublasStatus_t remat_cublas_st_ = (stmt);                               \
    if (remat_cublas_st_ != CUBLAS_STATUS_SUCCESS)                                \
      ::remat::cuda::fail("cuBLAS", #stmt, __FILE__, __LINE__,                    \
                          ::remat::cuda::cublas_status_string(remat_cublas_st_)); \
  } while (0)

// NCCL and CUPTI checks exist where their headers were included first.
#ifdef NCCL_MAJOR
#define REMAT_NCCL_CHECK(stmt)                                                                    \
  do {                                                                                            \
    const ncclResult_t remat_nccl_st_ = (stmt);                                                   \
    if (remat_nccl_st_ != ncclSuccess)                                                            \
      ::remat::cuda::fail("NCCL", #stmt, __FILE__, __LINE__, ncclGetErrorString(remat_nccl_st_)); \
  } while (0)
#endif
#ifdef CUPTI_API_VERSION
#define REMAT_CUPTI_CHECK(stmt)                                                  \
  do {                                                                           \
    const CUptiResult remat_cupti_st_ = (stmt);                                  \
    if (remat_cupti_st_ != CUPTI_SUCCESS) {                                      \
      const char* remat_cupti_msg_ = nullptr;                                    \
      cuptiGetResultString(remat_cupti_st_, &remat_cupti_msg_);                  \
      ::remat::cuda::fail("CUPTI", #stmt, __FILE__, __LINE__, remat_cupti_msg_); \
    }                                                                            \
  } while (0)
#endif

// After a kernel launch: checks the launch; in debug mode also synchronizes `stream` and
// checks the kernel's execution.
#define REMAT_CUDA_LAUNCH_CHECK(stream)                                                       \
  do {                                                                                        \
    REMAT_CUDA_CHECK(cudaGetLastError());                                                     \
    if (::remat::cuda::debug_sync_enabled()) REMAT_CUDA_CHECK(cudaStreamSynchronize(stream)); \
  } while (0)

namespace remat::cuda {

// Properties of the current device, queried once per device and cached.
inline const cudaDeviceProp& device_props() {
  constexpr int kMaxDevices = 64;
  static cudaDeviceProp props[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  int dev = 0;
  REMAT_CUDA_CHECK(cudaGetDevice(&dev));
  REMAT_CHECK(dev >= 0 && dev < kMaxDevices, "device index out of range");
  std::call_once(once[dev], [dev] { REMAT_CUDA_CHECK(cudaGetDeviceProperties(&props[dev], dev)); });
  return props[dev];
}

}  // namespace remat::cuda

#if defined(__CUDACC__)
// ---- device helpers (nvcc only) ----
namespace remat::cuda {

// Element conversions between the storage type T (float or __nv_bfloat16) and fp32 math.
__device__ __forceinline__ float to_f32(float x) {
  return x;
}
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16 bytes of T, moved with one vector load/store. kN elements (4 fp32 or 8 bf16).
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
  __device__ __forceinline__ static Pack16 load(const T* p) {
    Pack16 r;
    *reinterpret_cast<int4*>(&r) = *reinterpret_cast<const int4*>(p);
    return r;
  }
  // Read-only, streamed (not kept in L1): for data read once.
  __device__ __forceinline__ static Pack16 load_stream(const T* p) {
    Pack16 r;
    *reinterpret_cast<int4*>(&r) = __ldcs(reinterpret_cast<const int4*>(p));
    return r;
  }
  __device__ __forceinline__ void store(T* p) const {
    *reinterpret_cast<int4*>(p) = *reinterpret_cast<const int4*>(this);
  }
};

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Sum over the block in a fixed order (deterministic); every thread gets the result.
// `scratch` holds at least 32 floats; blockDim.x is a multiple of 32.
__device__ __forceinline__ float block_sum(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  x = warp_sum(x);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nwarps ? scratch[lane] : 0.f;
  return warp_sum(x);
}
__device__ __forceinline__ float block_max(float x, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  x = warp_max(x);
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  x = lane < nwarps ? scratch[lane] : -INFINITY;
  return warp_max(x);
}

// True when p is 16-byte aligned (vector path allowed).
__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

}  // namespace remat::cuda
#endif  // __CUDACC__
