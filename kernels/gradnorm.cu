// Sum of squares (deterministic two-pass reduction) and the clip factor, on the device.
#include "kernels/cuda_common.cuh"
#include "kernels/gradnorm.h"

namespace remat::cuda {
namespace {

constexpr int kBlocks = 1024;   // most first-pass blocks (partials)
constexpr int kThreads = 256;   // threads per block in both passes
constexpr int kPerThread = 16;  // elements per thread before another block is added

template <typename T>
struct SumSqParams {
  float* partials;  // (gridDim.x) block sums, overwritten
  const T* g;       // (n) values
  size_t n;         // element count
};

// Grid depends only on n: thread i sums elements i, i + stride, ... in order (fp32), then the
// block sums its threads in a fixed tree order.
template <typename T>
__global__ void sum_squares_kernel(const __grid_constant__ SumSqParams<T> p) {
  __shared__ float scratch[32];
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  float acc = 0.f;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < p.n;
       i += stride) {
    const float x = to_f32(p.g[i]);
    acc += x * x;
  }
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) p.partials[blockIdx.x] = acc;
}

__device__ __forceinline__ double warp_sum_d(double x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

struct FinishParams {
  float* out;             // device scalar: = or += the total
  const float* partials;  // (count)
  int count;              // partials to sum
  bool accumulate;        // += instead of =
};

// One block: thread i sums partials i, i + kThreads, ... in double, then a fixed tree.
__global__ void finish_kernel(const __grid_constant__ FinishParams p) {
  __shared__ double scratch[kThreads / 32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < p.count; i += blockDim.x) acc += p.partials[i];
  acc = warp_sum_d(acc);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
    *p.out = static_cast<float>(p.accumulate ? *p.out + total : total);
  }
}

struct ClipParams {
  float* scale;         // device scalar, overwritten
  float* norm;          // device scalar or null
  const float* sum_sq;  // device scalar
  float max_norm;       // <= 0: clipping off
};

__global__ void clip_kernel(const __grid_constant__ ClipParams p) {
  const double norm = sqrt(static_cast<double>(*p.sum_sq));
  if (p.norm) *p.norm = static_cast<float>(norm);
  float s = 1.0f;
  if (p.max_norm > 0.0f && isfinite(norm))
    s = static_cast<float>(fmin(1.0, p.max_norm / (norm + 1e-6)));
  *p.scale = s;
}

}  // namespace

size_t gradnorm_workspace_floats() {
  return kBlocks;
}

template <typename Elem>
void sum_squares(float* out, const Elem* g, size_t n, float* workspace, bool accumulate,
                 cudaStream_t stream) {
  REMAT_CHECK(out && workspace && (n == 0 || g), "sum_squares: null pointer");
  NvtxRange range("sum_squares");
  const int blocks = static_cast<int>(std::max<size_t>(
      1, std::min<size_t>(kBlocks, (n + kThreads * kPerThread - 1) / (kThreads * kPerThread))));
  sum_squares_kernel<Elem><<<blocks, kThreads, 0, stream>>>(SumSqParams<Elem>{workspace, g, n});
  REMAT_CUDA_LAUNCH_CHECK(stream);
  finish_kernel<<<1, kThreads, 0, stream>>>(FinishParams{out, workspace, blocks, accumulate});
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

void clip_scale(float* scale, float* norm, const float* sum_sq, float max_norm,
                cudaStream_t stream) {
  REMAT_CHECK(scale && sum_sq, "clip_scale: null pointer");
  NvtxRange range("clip_scale");
  clip_kernel<<<1, 1, 0, stream>>>(ClipParams{scale, norm, sum_sq, max_norm});
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

template void sum_squares<float>(float*, const float*, size_t, float*, bool, cudaStream_t);
template void sum_squares<__nv_bfloat16>(float*, const __nv_bfloat16*, size_t, float*, bool,
                                         cudaStream_t);

}  // namespace remat::cuda
