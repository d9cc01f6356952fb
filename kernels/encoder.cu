// Token + position embedding forward, and a deterministic backward.
//
// Backward plan (all on the stream, no float atomics):
//   1. counts[v] = number of positions with token v   (integer atomics: exact)
//   2. starts = exclusive scan of counts               (one block)
//   3. unsorted[starts[v] + k] = positions of token v, in arbitrary order (integer atomics)
//   4. sorted = each bucket ordered by position: an entry's rank is the number of entries of
//      its bucket with a smaller position. Cost: sum of squared bucket sizes (natural text:
//      small; a batch of one repeated token: (B T)^2 / 2 comparisons).
//   5. one block per bucket leader (and channel slice) sums dout rows in sorted order and
//      adds to dwte; dwpe sums over b in order.
#include "kernels/cuda_common.cuh"
#include "kernels/encoder.h"

namespace remat::cuda {
namespace {

template <typename T>
struct EncFwdParams {
  T* out;             // (B T, C) overwritten
  const int* tokens;  // (B T)
  const T* wte;       // (Vp, C)
  const T* wpe;       // (maxT, C), or null (no position embedding)
  int N;              // B * T
  int seq_len;        // T: position = row % T
  int C;              // channels, % 8 == 0
};

template <typename T>
__global__ void encoder_forward_kernel(const __grid_constant__ EncFwdParams<T> p) {
  using P = Pack16<T>;
  const int packs_per_row = p.C / P::kN;
  const size_t total = static_cast<size_t>(p.N) * packs_per_row;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int n = static_cast<int>(i / packs_per_row);
    const int c = static_cast<int>(i % packs_per_row) * P::kN;
    const int t = n % p.seq_len;
    const P a = P::load(p.wte + static_cast<size_t>(p.tokens[n]) * p.C + c);
    P o = a;
    if (p.wpe != nullptr) {
      const P b = P::load(p.wpe + static_cast<size_t>(t) * p.C + c);
#pragma unroll
      for (int j = 0; j < P::kN; ++j) o.v[j] = from_f32<T>(to_f32(a.v[j]) + to_f32(b.v[j]));
    }
    o.store(p.out + static_cast<size_t>(n) * p.C + c);
  }
}

// The backward's integer scratch, carved from the caller's workspace.
struct Buckets {
  int* counts;    // (Vp) positions per token
  int* starts;    // (Vp + 1) exclusive scan of counts; starts[Vp] = N
  int* cursor;    // (Vp) fill cursors
  int* unsorted;  // (N) positions grouped by token, arbitrary order within a bucket
  int* sorted;    // (N) positions grouped by token, increasing within a bucket
};

Buckets carve(void* workspace, int N, int Vp) {
  int* w = static_cast<int*>(workspace);
  Buckets b;
  b.counts = w;
  b.cursor = w + Vp;
  b.starts = w + 2 * static_cast<size_t>(Vp);
  b.unsorted = b.starts + Vp + 1;
  b.sorted = b.unsorted + N;
  return b;
}

struct BucketParams {
  Buckets bk;         // scratch (see Buckets)
  const int* tokens;  // (N)
  int N;              // positions
  int Vp;             // buckets
};

__global__ void histogram_kernel(const __grid_constant__ BucketParams p) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n < p.N) atomicAdd(&p.bk.counts[p.tokens[n]], 1);
}

// One block of 1024 threads: thread i scans a contiguous segment of counts.
__global__ void scan_kernel(const __grid_constant__ BucketParams p) {
  __shared__ int warp_tot[32];
  const int per = (p.Vp + blockDim.x - 1) / blockDim.x;
  const int lo = min(p.Vp, static_cast<int>(threadIdx.x) * per), hi = min(p.Vp, lo + per);
  int local = 0;
  for (int v = lo; v < hi; ++v) local += p.bk.counts[v];
  // Inclusive warp scan, then scan of the warp totals.
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inc = local;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int u = __shfl_up_sync(0xffffffffu, inc, o);
    if (lane >= o) inc += u;
  }
  if (lane == 31) warp_tot[warp] = inc;
  __syncthreads();
  if (warp == 0) {
    int t = lane < static_cast<int>(blockDim.x / 32) ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int u = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += u;
    }
    warp_tot[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  int run = inc - local + (warp > 0 ? warp_tot[warp - 1] : 0);  // exclusive prefix
  for (int v = lo; v < hi; ++v) {
    p.bk.starts[v] = run;
    run += p.bk.counts[v];
  }
  if (threadIdx.x == 0) p.bk.starts[p.Vp] = p.N;
}

__global__ void fill_kernel(const __grid_constant__ BucketParams p) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= p.N) return;
  const int v = p.tokens[n];
  p.bk.unsorted[p.bk.starts[v] + atomicAdd(&p.bk.cursor[v], 1)] = n;
}

__global__ void rank_kernel(const __grid_constant__ BucketParams p) {
  const int q = blockIdx.x * blockDim.x + threadIdx.x;
  if (q >= p.N) return;
  const int pos = p.bk.unsorted[q];
  const int v = p.tokens[pos];
  const int s = p.bk.starts[v], e = p.bk.starts[v + 1];
  int rank = 0;
  for (int r = s; r < e; ++r) rank += p.bk.unsorted[r] < pos;
  p.bk.sorted[s + rank] = pos;
}

template <typename T>
struct EncBwdParams {
  T* dwte;            // (Vp, C) +=
  const T* dout;      // (N, C)
  const int* tokens;  // (N)
  Buckets bk;         // sorted buckets
  int N;              // positions
  int C;              // channels, % 8 == 0
};

// Grid (N, channel slices): block x is slot x of `sorted`; only the first slot of each
// bucket works, summing the whole bucket in position order for its channel slice.
template <typename T>
__global__ void dwte_kernel(const __grid_constant__ EncBwdParams<T> p) {
  using P = Pack16<T>;
  const int slot = blockIdx.x;
  const int v = p.tokens[p.bk.sorted[slot]];
  const int s = p.bk.starts[v], e = p.bk.starts[v + 1];
  if (slot != s) return;
  const int c = (blockIdx.y * blockDim.x + threadIdx.x) * P::kN;
  if (c >= p.C) return;
  float acc[P::kN] = {};
  for (int r = s; r < e; ++r) {
    const P g = P::load(p.dout + static_cast<size_t>(p.bk.sorted[r]) * p.C + c);
#pragma unroll
    for (int j = 0; j < P::kN; ++j) acc[j] += to_f32(g.v[j]);
  }
  T* dst = p.dwte + static_cast<size_t>(v) * p.C + c;
  P o = P::load(dst);
#pragma unroll
  for (int j = 0; j < P::kN; ++j) o.v[j] = from_f32<T>(to_f32(o.v[j]) + acc[j]);
  o.store(dst);
}

template <typename T>
struct DwpeParams {
  T* dwpe;        // (>= T, C) +=
  const T* dout;  // (B, T, C)
  int B;          // batch
  int seq_len;    // T
  int C;          // channels, % 8 == 0
};

// One thread per (t, pack of channels): sums over b in order.
template <typename T>
__global__ void dwpe_kernel(const __grid_constant__ DwpeParams<T> p) {
  using P = Pack16<T>;
  const int packs = p.C / P::kN;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.seq_len * packs) return;
  const int t = i / packs, c = (i % packs) * P::kN;
  float acc[P::kN] = {};
  for (int b = 0; b < p.B; ++b) {
    const P g = P::load(p.dout + (static_cast<size_t>(b) * p.seq_len + t) * p.C + c);
#pragma unroll
    for (int j = 0; j < P::kN; ++j) acc[j] += to_f32(g.v[j]);
  }
  T* dst = p.dwpe + static_cast<size_t>(t) * p.C + c;
  P o = P::load(dst);
#pragma unroll
  for (int j = 0; j < P::kN; ++j) o.v[j] = from_f32<T>(to_f32(o.v[j]) + acc[j]);
  o.store(dst);
}

void check_shape(const char* who, int B, int T, int C) {
  REMAT_CHECK(B >= 0 && T >= 0 && C > 0 && C % 8 == 0,
              std::string(who) + ": need B, T >= 0, C > 0, C % 8 == 0; got B=" + std::to_string(B) +
                  " T=" + std::to_string(T) + " C=" + std::to_string(C));
}

}  // namespace

template <typename Elem>
void encoder_forward(Elem* out, const int* tokens, const Elem* wte, const Elem* wpe, int B, int T,
                     int C, cudaStream_t stream) {
  check_shape("encoder_forward", B, T, C);
  const int N = B * T;
  if (N == 0) return;
  REMAT_CHECK(out && tokens && wte, "encoder_forward: null pointer");  // wpe may be null
  REMAT_CHECK(aligned16(out) && aligned16(wte) && aligned16(wpe),
              "encoder_forward: pointers must be 16-byte aligned");
  NvtxRange range("encoder_forward");
  EncFwdParams<Elem> p{out, tokens, wte, wpe, N, T, C};
  const long packs = static_cast<long>(N) * (C / Pack16<Elem>::kN);
  const int blocks = static_cast<int>(
      std::min<long>(ceil_div(packs, 256), device_props().multiProcessorCount * 16L));
  encoder_forward_kernel<Elem><<<blocks, 256, 0, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

size_t encoder_backward_workspace_bytes(int B, int T, int Vp) {
  const size_t N = static_cast<size_t>(B) * T;
  return sizeof(int) * (3 * static_cast<size_t>(Vp) + 1 + 2 * N);
}

template <typename Elem>
void encoder_backward(Elem* dwte, Elem* dwpe, const Elem* dout, const int* tokens, int B, int T,
                      int C, int Vp, void* workspace, cudaStream_t stream) {
  check_shape("encoder_backward", B, T, C);
  REMAT_CHECK(Vp > 0, "encoder_backward: Vp must be positive");
  const int N = B * T;
  if (N == 0) return;
  REMAT_CHECK(dwte && dout && tokens && workspace,
              "encoder_backward: null pointer");  // dwpe may be null
  REMAT_CHECK(aligned16(dwte) && aligned16(dwpe) && aligned16(dout),
              "encoder_backward: pointers must be 16-byte aligned");
  NvtxRange range("encoder_backward");
  const Buckets bk = carve(workspace, N, Vp);
  REMAT_CUDA_CHECK(cudaMemsetAsync(bk.counts, 0, 2 * sizeof(int) * Vp, stream));  // + cursor
  const BucketParams bp{bk, tokens, N, Vp};
  histogram_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(bp);
  REMAT_CUDA_LAUNCH_CHECK(stream);
  scan_kernel<<<1, 1024, 0, stream>>>(bp);
  REMAT_CUDA_LAUNCH_CHECK(stream);
  fill_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(bp);
  REMAT_CUDA_LAUNCH_CHECK(stream);
  rank_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(bp);
  REMAT_CUDA_LAUNCH_CHECK(stream);

  constexpr int kSliceThreads = 64;  // packs per channel slice
  const int packs = C / Pack16<Elem>::kN;
  const EncBwdParams<Elem> p{dwte, dout, tokens, bk, N, C};
  dwte_kernel<Elem><<<dim3(N, ceil_div(packs, kSliceThreads)), kSliceThreads, 0, stream>>>(p);
  REMAT_CUDA_LAUNCH_CHECK(stream);
  if (dwpe == nullptr) return;  // no position embedding
  const DwpeParams<Elem> q{dwpe, dout, B, T, C};
  dwpe_kernel<Elem><<<ceil_div(static_cast<long>(T) * packs, 256), 256, 0, stream>>>(q);
  REMAT_CUDA_LAUNCH_CHECK(stream);
}

#define REMAT_INSTANTIATE(E)                                                                 \
  template void encoder_forward<E>(E*, const int*, const E*, const E*, int, int, int,        \
                                   cudaStream_t);                                            \
  template void encoder_backward<E>(E*, E*, const E*, const int*, int, int, int, int, void*, \
                                    cudaStream_t);
REMAT_INSTANTIATE(float)
REMAT_INSTANTIATE(__nv_bfloat16)
#undef REMAT_INSTANTIATE

}  // namespace remat::cuda
