// Token + position embedding forward, and a deterministic backward.
//
// Backward plan (all on the stream, no float atomics), linear in B T whatever the tokens:
//   1. sort the positions by token, stably (so increasing within a token): an LSD radix sort
//      of 8-bit digits, ceil(bits(Vp - 1) / 8) passes (2 for GPT-2's 50304). A pass counts
//      each block's digits (integer atomics in shared memory: exact), scans the (digit,
//      block) counts in one block, and scatters: a position's slot is its digit's offset for
//      its block plus its rank among the same digit in the block, in index order (warp
//      match + counts of the earlier warps).
//   2. end[v] = one past the last sorted slot of each present token.
//   3. one thread per (sorted slot, pack of channels); the thread of a token's first slot
//      adds the token's dout rows, in increasing position, to its pack of dwte, starting
//      from the stored dwte as the CPU reference does. dwpe: one thread per (t, pack) adds
//      b = 0, 1, ... to the stored dwpe. In fp32 both give the CPU reference's bits.
// A batch of one repeated token costs one thread per pack a chain of B T rows (linear; the
// chain is the price of the fixed summation order).
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

// ---- backward: a stable sort of the positions by token (LSD radix, linear in B T) ----

constexpr int kSortThreads = 256;  // positions per block of the sort, one per thread
constexpr int kDigitBits = 8;      // bits of the token per pass
constexpr int kDigits = 1 << kDigitBits;

int sort_blocks(int N) {
  return ceil_div(N, kSortThreads);
}

// Passes that cover every token < Vp (at least one).
int sort_passes(int Vp) {
  int bits = 0;
  while (bits < 31 && (Vp - 1) >> bits) ++bits;
  return std::max(1, ceil_div(bits, kDigitBits));
}

// The backward's integer scratch, carved from the caller's workspace.
struct Buckets {
  int* keys[2];  // (N) each: tokens, ordered by the digits sorted so far (ping-pong)
  int* pos[2];   // (N) each: the positions that go with keys
  int* table;    // (kDigits, sort_blocks(N)) digit counts per block, then their exclusive scan
  int* end;      // (Vp) end[v] = one past the last sorted slot of token v (present tokens only)
};

Buckets carve(void* workspace, int N) {
  int* w = static_cast<int*>(workspace);
  Buckets b;
  for (int i = 0; i < 2; ++i) {
    b.keys[i] = w + (2 * i) * static_cast<size_t>(N);
    b.pos[i] = w + (2 * i + 1) * static_cast<size_t>(N);
  }
  b.table = w + 4 * static_cast<size_t>(N);
  b.end = b.table + static_cast<size_t>(kDigits) * sort_blocks(N);
  return b;
}

struct SortPassParams {
  const int* keys_in;  // (N) tokens (pass 0: the batch's tokens)
  const int* pos_in;   // (N) positions, or null: position = index (pass 0)
  int* keys_out;       // (N) keys ordered stably by this pass's digit
  int* pos_out;        // (N) positions, moved with their keys
  int* table;          // (kDigits, blocks): counts, then offsets (exclusive scan, digit-major)
  int N;               // positions
  int shift;           // this pass's digit: (key >> shift) & (kDigits - 1)
  int blocks;          // sort_blocks(N)
};

// Block b counts the digits of positions [b kSortThreads, (b + 1) kSortThreads) (integer
// atomics on shared memory: exact) into table[digit][b].
__global__ void digit_count_kernel(const __grid_constant__ SortPassParams p) {
  __shared__ int count[kDigits];
  for (int d = threadIdx.x; d < kDigits; d += blockDim.x) count[d] = 0;
  __syncthreads();
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n < p.N) atomicAdd(&count[(p.keys_in[n] >> p.shift) & (kDigits - 1)], 1);
  __syncthreads();
  for (int d = threadIdx.x; d < kDigits; d += blockDim.x)
    p.table[static_cast<size_t>(d) * p.blocks + blockIdx.x] = count[d];
}

struct ScanParams {
  int* data;  // (n) replaced by its exclusive prefix sums
  int n;      // entries
};

// One block of 1024 threads: thread i scans a contiguous segment of data.
__global__ void exclusive_scan_kernel(const __grid_constant__ ScanParams p) {
  __shared__ int warp_tot[32];
  const int per = (p.n + blockDim.x - 1) / blockDim.x;
  const int lo = min(p.n, static_cast<int>(threadIdx.x) * per), hi = min(p.n, lo + per);
  int local = 0;
  for (int i = lo; i < hi; ++i) local += p.data[i];
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
  for (int i = lo; i < hi; ++i) {
    const int v = p.data[i];
    p.data[i] = run;
    run += v;
  }
}

// Block b moves its positions to their slots: table[digit][b] (what smaller digits and
// earlier blocks take), plus this digit's count in the block's earlier warps, plus the rank
// among the lanes of its own warp with this digit. Index order within a digit is kept:
// the pass is stable.
__global__ void __launch_bounds__(kSortThreads)
    digit_scatter_kernel(const __grid_constant__ SortPassParams p) {
  constexpr int kWarps = kSortThreads / 32;
  __shared__ int warp_count[kWarps][kDigits];  // this block's digit counts per warp
  for (int i = threadIdx.x; i < kWarps * kDigits; i += blockDim.x) (&warp_count[0][0])[i] = 0;
  __syncthreads();
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = n < p.N;
  const int key = active ? p.keys_in[n] : 0;
  const int digit = active ? (key >> p.shift) & (kDigits - 1) : kDigits;  // idle: own group
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const unsigned peers = __match_any_sync(0xffffffffu, digit);
  const int rank = __popc(peers & ((1u << lane) - 1u));
  if (active && rank == 0) warp_count[warp][digit] = __popc(peers);
  __syncthreads();
  if (!active) return;
  int slot = p.table[static_cast<size_t>(digit) * p.blocks + blockIdx.x] + rank;
  for (int w = 0; w < warp; ++w) slot += warp_count[w][digit];
  p.keys_out[slot] = key;
  p.pos_out[slot] = p.pos_in != nullptr ? p.pos_in[n] : n;
}

struct BucketEndParams {
  const int* keys;  // (N) sorted tokens
  int* end;         // (Vp) one past each present token's last slot
  int N;            // positions
};

__global__ void bucket_end_kernel(const __grid_constant__ BucketEndParams p) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.N) return;
  const int v = p.keys[i];
  if (i + 1 == p.N || p.keys[i + 1] != v) p.end[v] = i + 1;
}

template <typename T>
struct EncBwdParams {
  T* dwte;          // (Vp, C) +=
  const T* dout;    // (N, C)
  const int* keys;  // (N) sorted tokens
  const int* pos;   // (N) positions, increasing within a token
  const int* end;   // (Vp) bucket ends
  int N;            // positions
  int C;            // channels, % 8 == 0
};

// One thread per (sorted slot, pack of channels); the thread of a bucket's first slot adds
// the bucket's dout rows, in increasing position, to the pack of dwte: acc starts at the
// stored dwte, as the CPU reference's in-place sum does, so fp32 gives the CPU's bits.
template <typename T>
__global__ void dwte_kernel(const __grid_constant__ EncBwdParams<T> p) {
  using P = Pack16<T>;
  const int packs = p.C / P::kN;
  const size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= static_cast<size_t>(p.N) * packs) return;
  const int slot = static_cast<int>(i / packs), c = static_cast<int>(i % packs) * P::kN;
  const int v = p.keys[slot];
  if (slot > 0 && p.keys[slot - 1] == v) return;  // not the bucket's first slot
  const int e = p.end[v];
  T* dst = p.dwte + static_cast<size_t>(v) * p.C + c;
  P o = P::load(dst);
  float acc[P::kN];
#pragma unroll
  for (int j = 0; j < P::kN; ++j) acc[j] = to_f32(o.v[j]);
#pragma unroll 4
  for (int r = slot; r < e; ++r) {
    const P g = P::load(p.dout + static_cast<size_t>(p.pos[r]) * p.C + c);
#pragma unroll
    for (int j = 0; j < P::kN; ++j) acc[j] += to_f32(g.v[j]);
  }
#pragma unroll
  for (int j = 0; j < P::kN; ++j) o.v[j] = from_f32<T>(acc[j]);
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

// One thread per (t, pack of channels): adds b = 0, 1, ... in order to the stored dwpe (the
// CPU reference's order: fp32 gives its bits).
template <typename T>
__global__ void dwpe_kernel(const __grid_constant__ DwpeParams<T> p) {
  using P = Pack16<T>;
  const int packs = p.C / P::kN;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.seq_len * packs) return;
  const int t = i / packs, c = (i % packs) * P::kN;
  T* dst = p.dwpe + static_cast<size_t>(t) * p.C + c;
  P o = P::load(dst);
  float acc[P::kN];
#pragma unroll
  for (int j = 0; j < P::kN; ++j) acc[j] = to_f32(o.v[j]);
  for (int b = 0; b < p.B; ++b) {
    const P g = P::load(p.dout + (static_cast<size_t>(b) * p.seq_len + t) * p.C + c);
#pragma unroll
    for (int j = 0; j < P::kN; ++j) acc[j] += to_f32(g.v[j]);
  }
#pragma unroll
  for (int j = 0; j < P::kN; ++j) o.v[j] = from_f32<T>(acc[j]);
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
  const int N = std::max(0, B) * std::max(0, T);
  return sizeof(int) * (4 * static_cast<size_t>(N) + static_cast<size_t>(kDigits) * sort_blocks(N) +
                        std::max(Vp, 0));
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
  const Buckets bk = carve(workspace, N);
  const int blocks = sort_blocks(N), passes = sort_passes(Vp);
  for (int pass = 0; pass < passes; ++pass) {
    const int in = (pass + 1) % 2, out = pass % 2;  // pass 0 reads the tokens, writes [0]
    const SortPassParams sp{pass == 0 ? tokens : bk.keys[in],
                            pass == 0 ? nullptr : bk.pos[in],
                            bk.keys[out],
                            bk.pos[out],
                            bk.table,
                            N,
                            pass * kDigitBits,
                            blocks};
    digit_count_kernel<<<blocks, kSortThreads, 0, stream>>>(sp);
    REMAT_CUDA_LAUNCH_CHECK(stream);
    exclusive_scan_kernel<<<1, 1024, 0, stream>>>(ScanParams{bk.table, kDigits * blocks});
    REMAT_CUDA_LAUNCH_CHECK(stream);
    digit_scatter_kernel<<<blocks, kSortThreads, 0, stream>>>(sp);
    REMAT_CUDA_LAUNCH_CHECK(stream);
  }
  const int* keys = bk.keys[(passes - 1) % 2];
  const int* pos = bk.pos[(passes - 1) % 2];
  bucket_end_kernel<<<ceil_div(N, 256), 256, 0, stream>>>(BucketEndParams{keys, bk.end, N});
  REMAT_CUDA_LAUNCH_CHECK(stream);

  const int packs = C / Pack16<Elem>::kN;
  const EncBwdParams<Elem> p{dwte, dout, keys, pos, bk.end, N, C};
  dwte_kernel<Elem><<<ceil_div(static_cast<long>(N) * packs, 256), 256, 0, stream>>>(p);
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
