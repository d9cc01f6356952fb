// Fused classifier: per row chunk, logits by cuBLASLt, then one kernel per row for max,
// log-sum-exp, the loss and dlogits (in place over the logits), then the two backward GEMMs.
// The (N, Vp) logits never exist at once: only (chunk_rows, Vp) of workspace. As on the CPU,
// only the first V rows of wte take part in any GEMM (padded rows are never read, and dwte's
// padded rows are never written), so their contents do not matter.
#include "kernels/classifier.h"
#include "kernels/cuda_common.cuh"
#include "kernels/matmul.h"

namespace remat::cuda {
namespace {

constexpr int kThreads = 1024;  // threads per row of the fused softmax/loss kernel

template <typename T>
struct SoftmaxLossParams {
  T* logits;           // (rows, Vp) this chunk's logits (columns < V); overwritten with dlogits
                       // when backward (columns >= V set to 0)
  float* losses;       // (rows) = lse - logit[target]
  const int* targets;  // (rows)
  int V;               // real vocabulary: columns >= V take no part
  int Vp;              // padded row length
  float dloss;         // dlogits = dloss * (softmax - onehot)
  bool backward;       // write dlogits
  bool vec;            // Vp % pack == 0 and logits 16-byte aligned: vector accesses
};

// Running (max, sum of exp(x - max)) of one thread, updated with x.
__device__ __forceinline__ void online(float& m, float& s, float x) {
  if (x > m) {
    s = s * expf(m - x) + 1.f;  // m == -inf: s == 0, expf(-inf) == 0
    m = x;
  } else {
    s += expf(x - m);
  }
}

// One block per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    softmax_loss_kernel(const __grid_constant__ SoftmaxLossParams<T> p) {
  using P = Pack16<T>;
  __shared__ float scratch[32];
  T* row = p.logits + static_cast<size_t>(blockIdx.x) * p.Vp;
  float m = -INFINITY, s = 0.f;
  if (p.vec) {
    for (int c0 = threadIdx.x * P::kN; c0 < p.Vp; c0 += blockDim.x * P::kN) {
      const P x = P::load(row + c0);
#pragma unroll
      for (int j = 0; j < P::kN; ++j)
        if (c0 + j < p.V) online(m, s, to_f32(x.v[j]));
    }
  } else {
    for (int c = threadIdx.x; c < p.V; c += blockDim.x) online(m, s, to_f32(row[c]));
  }
  const float M = block_max(m, scratch);
  const float S = block_sum(m == -INFINITY ? 0.f : s * expf(m - M), scratch);
  const float lse = M + logf(S);
  const int target = p.targets[blockIdx.x];
  if (threadIdx.x == 0) p.losses[blockIdx.x] = lse - to_f32(row[target]);
  if (!p.backward) return;
  __syncthreads();  // row[target] read above before it is overwritten below
  const auto grad = [&](int c, float x) {
    if (c >= p.V) return 0.f;
    return p.dloss * (expf(x - lse) - (c == target ? 1.f : 0.f));
  };
  if (p.vec) {
    for (int c0 = threadIdx.x * P::kN; c0 < p.Vp; c0 += blockDim.x * P::kN) {
      P x = P::load(row + c0);
#pragma unroll
      for (int j = 0; j < P::kN; ++j) x.v[j] = from_f32<T>(grad(c0 + j, to_f32(x.v[j])));
      x.store(row + c0);
    }
  } else {
    for (int c = threadIdx.x; c < p.Vp; c += blockDim.x)
      row[c] = from_f32<T>(grad(c, to_f32(row[c])));
  }
}

struct MeanParams {
  float* mean;          // device scalar, overwritten
  const float* losses;  // (N)
  int N;                // rows
};

// One block: fixed-order sum in double, divided by N.
__global__ void mean_kernel(const __grid_constant__ MeanParams p) {
  __shared__ double warp_tot[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < p.N; i += blockDim.x) acc += p.losses[i];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (threadIdx.x % 32 == 0) warp_tot[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < static_cast<int>(blockDim.x / 32); ++w) t += warp_tot[w];
    *p.mean = static_cast<float>(t / p.N);
  }
}

template <typename T>
struct MaskParams {
  T* logits;  // (N, Vp): columns >= V set to -inf
  int N, V, Vp;
};

template <typename T>
__global__ void mask_padded_kernel(const __grid_constant__ MaskParams<T> p) {
  const int pad = p.Vp - p.V;
  const size_t total = static_cast<size_t>(p.N) * pad;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p.logits[(i / pad) * p.Vp + p.V + i % pad] = from_f32<T>(-INFINITY);
}

void check_shape(const char* who, int N, int C, int V, int Vp) {
  REMAT_CHECK(N >= 0 && C > 0 && V > 0 && Vp >= V,
              std::string(who) + ": bad shape N=" + std::to_string(N) + " C=" + std::to_string(C) +
                  " V=" + std::to_string(V) + " Vp=" + std::to_string(Vp));
}

}  // namespace

template <typename Elem>
void classifier_forward_backward(float* losses, Elem* dx, Elem* dwte, const Elem* x,
                                 const Elem* wte, const int* targets, int N, int C, int V, int Vp,
                                 float dloss, Elem* workspace, int chunk_rows, cudaStream_t stream,
                                 float* mean_loss) {
  check_shape("classifier_forward_backward", N, C, V, Vp);
  REMAT_CHECK(chunk_rows > 0, "classifier_forward_backward: chunk_rows must be positive");
  REMAT_CHECK(losses && x && wte && targets && workspace && (dx == nullptr || dwte),
              "classifier_forward_backward: null pointer");
  NvtxRange range(dx ? "classifier_forward_backward" : "classifier_forward");
  const bool vec = Vp % Pack16<Elem>::kN == 0 && aligned16(workspace);
  for (int r0 = 0; r0 < N; r0 += chunk_rows) {
    const int R = std::min(chunk_rows, N - r0);
    const Elem* xc = x + static_cast<size_t>(r0) * C;  // (R, C)
    // logits (R, V of Vp) = xc @ wte[:V]^T
    gemm(cpu::Trans::kNo, cpu::Trans::kYes, R, V, C, xc, C, wte, C, 0.f, workspace, Vp, stream);
    const SoftmaxLossParams<Elem> p{workspace, losses + r0, targets + r0,  V,
                                    Vp,        dloss,       dx != nullptr, vec};
    softmax_loss_kernel<Elem><<<R, kThreads, 0, stream>>>(p);
    REMAT_CUDA_LAUNCH_CHECK(stream);
    if (dx) {
      // dx (R, C) = dlogits (R, V) @ wte[:V]; dwte[:V] (V, C) += dlogits^T @ xc
      gemm(cpu::Trans::kNo, cpu::Trans::kNo, R, C, V, workspace, Vp, wte, C, 0.f,
           dx + static_cast<size_t>(r0) * C, C, stream);
      gemm(cpu::Trans::kYes, cpu::Trans::kNo, V, C, R, workspace, Vp, xc, C, 1.f, dwte, C, stream);
    }
  }
  if (mean_loss && N > 0) {
    mean_kernel<<<1, 1024, 0, stream>>>(MeanParams{mean_loss, losses, N});
    REMAT_CUDA_LAUNCH_CHECK(stream);
  }
}

template <typename Elem>
void classifier_logits(Elem* logits, const Elem* x, const Elem* wte, int N, int C, int V, int Vp,
                       cudaStream_t stream) {
  check_shape("classifier_logits", N, C, V, Vp);
  if (N == 0) return;
  REMAT_CHECK(logits && x && wte, "classifier_logits: null pointer");
  NvtxRange range("classifier_logits");
  gemm(cpu::Trans::kNo, cpu::Trans::kYes, N, V, C, x, C, wte, C, 0.f, logits, Vp, stream);
  if (Vp > V) {
    const MaskParams<Elem> p{logits, N, V, Vp};
    mask_padded_kernel<Elem>
        <<<std::min(ceil_div(static_cast<long>(N) * (Vp - V), 256), 4096), 256, 0, stream>>>(p);
    REMAT_CUDA_LAUNCH_CHECK(stream);
  }
}

#define REMAT_INSTANTIATE(E)                                                                     \
  template void classifier_forward_backward<E>(float*, E*, E*, const E*, const E*, const int*,   \
                                               int, int, int, int, float, E*, int, cudaStream_t, \
                                               float*);                                          \
  template void classifier_logits<E>(E*, const E*, const E*, int, int, int, int, cudaStream_t);
REMAT_INSTANTIATE(float)
REMAT_INSTANTIATE(__nv_bfloat16)
#undef REMAT_INSTANTIATE

}  // namespace remat::cuda
