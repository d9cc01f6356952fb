// Linear layers on cuBLASLt, row-major tensors mapped onto column-major GEMMs:
//   forward   out^T (OC, N)  = w^T-view (OC, C) * inp^T (C, N)   [A = w, op T; B = inp, op N]
//   dinp      dinp^T (C, N)  = w-view (C, OC) * dout^T (OC, N)   [A = w, op N; B = dout, op N]
//   dw        dw^T (C, OC)  += inp^T (C, N) * dout (N, OC)       [A = inp, op N; B = dout, op T]
// Epilogues: BIAS and GELU_AUX(_BIAS) in the forward, DGELU in dinp; when cuBLASLt offers no
// algorithm for an epilogue, the plain GEMM runs and a small kernel applies it instead. The
// bias gradient is our own deterministic column sum (the contract is +=, and cuBLASLt's
// BGRAD epilogues write =).
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>

#include "kernels/cuda_common.cuh"
#include "kernels/gelu.h"
#include "kernels/matmul.h"

namespace remat::cuda {
namespace {

constexpr size_t kLtWorkspaceBytes = 32u << 20;  // cuBLASLt's workspace per stream
constexpr int kBiasChunks = 64;                  // row chunks of the bias-gradient first pass
constexpr int kMaxBiasCols = 16384;              // OC limit of the bias gradient
constexpr size_t kBiasPartialBytes = sizeof(float) * kBiasChunks * kMaxBiasCols;

template <typename T>
constexpr cudaDataType_t dtype_of();
template <>
constexpr cudaDataType_t dtype_of<float>() {
  return CUDA_R_32F;
}
template <>
constexpr cudaDataType_t dtype_of<__nv_bfloat16>() {
  return CUDA_R_16BF;
}

// One column-major GEMM D (m, n) = alpha op(A) op(B) + beta D, with an optional epilogue.
struct Gemm {
  bool transa, transb;  // op(A) = A^T, op(B) = B^T
  int m, n, k;          // D is (m, n), the reduction is over k
  const void* A;        // stored (transa ? k : m, transa ? m : k), leading dim lda
  int lda;
  const void* B;  // stored (transb ? n : k, transb ? k : n), leading dim ldb
  int ldb;
  void* D;  // (m, n), leading dim ldd; also C when beta != 0
  int ldd;
  float beta;              // 0: D overwritten; 1: accumulated
  cublasLtEpilogue_t epi;  // CUBLASLT_EPILOGUE_DEFAULT, _BIAS, _GELU_AUX(_BIAS), _DGELU
  const void* bias;        // (m) for BIAS epilogues
  void* aux;               // (m, n), leading dim m: GeLU input, written (GELU_AUX) or read (DGELU)
  cudaDataType_t dtype;    // of A, B, D, bias, aux
};

// Largest power of two (<= 16) dividing the pointer: given to the heuristic as the operand's
// minimum alignment (its default assumes 256) and part of the cache key. Capped at 16 (no
// algorithm asks for more) so that pointers of one shape at different arena offsets share
// one algorithm, hence the same bits (recompute relies on that).
int align_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (int b : {16, 8, 4, 2})
    if (a % b == 0) return b;
  return 1;
}

using AlgoKey =
    std::tuple<bool, bool, int, int, int, int, int, int, float, int, bool, int, int, int, int>;

// Process-wide cuBLASLt state: the handle, one workspace per stream and a heuristic cache.
// A stream's workspace lives until matmul_release_workspace(stream) (CudaStream's destructor)
// or matmul_release_workspaces().
struct Lt {
  std::mutex mu;
  cublasLtHandle_t handle = nullptr;
  int device = -1;
  std::unordered_map<cudaStream_t, void*> workspaces;  // kLtWorkspaceBytes + bias partials
  std::map<AlgoKey, std::pair<bool, cublasLtMatmulAlgo_t>> algos;  // found?, algorithm
};

// How the last GeLU-fused GEMM of this host thread ran (matmul_last_gelu_fusion).
thread_local GeluFusion last_gelu_fusion = GeluFusion::kNone;
Lt& lt() {
  static Lt* state = new Lt;  // never destroyed: may be used until process exit
  return *state;
}

// The stream's workspace (allocated on its first use) and the handle. Single device.
void* workspace_for(cudaStream_t stream, cublasLtHandle_t* handle) {
  Lt& s = lt();
  std::lock_guard<std::mutex> lk(s.mu);
  int dev = 0;
  REMAT_CUDA_CHECK(cudaGetDevice(&dev));
  if (s.handle == nullptr) {
    REMAT_CUBLAS_CHECK(cublasLtCreate(&s.handle));
    s.device = dev;
  }
  REMAT_CHECK(dev == s.device, "matmul: cuBLASLt state belongs to device " +
                                   std::to_string(s.device) + ", current is " +
                                   std::to_string(dev));
  *handle = s.handle;
  auto it = s.workspaces.find(stream);
  if (it != s.workspaces.end()) return it->second;
  void* ws = nullptr;
  REMAT_CUDA_CHECK(cudaMalloc(&ws, kLtWorkspaceBytes + kBiasPartialBytes));
  s.workspaces.emplace(stream, ws);
  return ws;
}

// Runs g on `stream`. Returns false (enqueuing nothing) when cuBLASLt has no algorithm for
// this epilogue and layout; throws on any other failure.
bool run_gemm(const Gemm& g, cudaStream_t stream) {
  cublasLtHandle_t handle;
  void* ws = workspace_for(stream, &handle);

  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  struct Cleanup {
    cublasLtMatmulDesc_t& op;
    cublasLtMatrixLayout_t &a, &b, &d;
    cublasLtMatmulPreference_t& pref;
    ~Cleanup() {
      if (pref) cublasLtMatmulPreferenceDestroy(pref);
      if (d) cublasLtMatrixLayoutDestroy(d);
      if (b) cublasLtMatrixLayoutDestroy(b);
      if (a) cublasLtMatrixLayoutDestroy(a);
      if (op) cublasLtMatmulDescDestroy(op);
    }
  } cleanup{op, a, b, d, pref};

  REMAT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const int32_t ta = g.transa ? CUBLAS_OP_T : CUBLAS_OP_N,
                tb = g.transb ? CUBLAS_OP_T : CUBLAS_OP_N;
  REMAT_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  REMAT_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  const uint32_t epi = g.epi;
  REMAT_CUBLAS_CHECK(
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE, &epi, sizeof(epi)));
  if (g.bias)
    REMAT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                      &g.bias, sizeof(g.bias)));
  if (g.aux) {
    const int64_t ld = g.m;
    REMAT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER,
                                                      &g.aux, sizeof(g.aux)));
    REMAT_CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, &ld, sizeof(ld)));
  }
  REMAT_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&a, g.dtype, g.transa ? g.k : g.m, g.transa ? g.m : g.k, g.lda));
  REMAT_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&b, g.dtype, g.transb ? g.n : g.k, g.transb ? g.k : g.n, g.ldb));
  REMAT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(&d, g.dtype, g.m, g.n, g.ldd));

  const AlgoKey key{g.transa,
                    g.transb,
                    g.m,
                    g.n,
                    g.k,
                    g.lda,
                    g.ldb,
                    g.ldd,
                    g.beta,
                    g.epi,
                    g.bias != nullptr,
                    static_cast<int>(g.dtype),
                    align_of(g.A) * 100 + align_of(g.B),
                    align_of(g.D),
                    align_of(g.bias) * 100 + align_of(g.aux)};
  cublasLtMatmulAlgo_t algo;
  {
    Lt& s = lt();
    std::lock_guard<std::mutex> lk(s.mu);
    auto it = s.algos.find(key);
    if (it == s.algos.end()) {
      REMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
      const uint64_t bytes = kLtWorkspaceBytes;
      REMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &bytes, sizeof(bytes)));
      // The operands' real alignment classes (those of the key), so that the algorithm
      // chosen can run on these pointers. C is D (beta reads D).
      const uint32_t align_a = align_of(g.A), align_b = align_of(g.B), align_d = align_of(g.D);
      REMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a, sizeof(align_a)));
      REMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b, sizeof(align_b)));
      REMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_d, sizeof(align_d)));
      REMAT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
          pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d, sizeof(align_d)));
      cublasLtMatmulHeuristicResult_t result{};
      int found = 0;
      const cublasStatus_t st =
          cublasLtMatmulAlgoGetHeuristic(handle, op, a, b, d, d, pref, 1, &result, &found);
      if (st != CUBLAS_STATUS_SUCCESS && st != CUBLAS_STATUS_NOT_SUPPORTED) REMAT_CUBLAS_CHECK(st);
      const bool ok = st == CUBLAS_STATUS_SUCCESS && found > 0;
      it = s.algos.emplace(key, std::make_pair(ok, result.algo)).first;
    }
    if (!it->second.first) return false;
    algo = it->second.second;
  }
  const float alpha = 1.f;
  REMAT_CUBLAS_CHECK(cublasLtMatmul(handle, op, &alpha, g.A, a, g.B, b, &g.beta, g.D, d, g.D, d,
                                    &algo, ws, kLtWorkspaceBytes, stream));
  return true;
}

template <typename T>
struct BiasParams {
  T* out;         // (N, OC) += bias per column
  const T* bias;  // (OC)
  int N, OC;      // shape
};

template <typename T>
__global__ void add_bias_kernel(const __grid_constant__ BiasParams<T> p) {
  const size_t total = static_cast<size_t>(p.N) * p.OC;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    p.out[i] = from_f32<T>(to_f32(p.out[i]) + to_f32(p.bias[i % p.OC]));
}

template <typename T>
struct DbiasParams {
  T* dbias;         // (OC) +=
  float* partials;  // (chunks, OC) fp32 column sums per row chunk
  const T* dout;    // (N, OC)
  int N, OC;        // shape
  int chunks;       // row chunks (gridDim.y of the first pass)
};

// Grid (ceil(OC / blockDim), chunks): thread = column; rows of chunk y summed in order.
template <typename T>
__global__ void dbias_partial_kernel(const __grid_constant__ DbiasParams<T> p) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= p.OC) return;
  const int rows = (p.N + p.chunks - 1) / p.chunks;
  const int r0 = blockIdx.y * rows, r1 = min(p.N, r0 + rows);
  float acc = 0.f;
  for (int r = r0; r < r1; ++r) acc += to_f32(p.dout[static_cast<size_t>(r) * p.OC + col]);
  p.partials[static_cast<size_t>(blockIdx.y) * p.OC + col] = acc;
}

template <typename T>
__global__ void dbias_final_kernel(const __grid_constant__ DbiasParams<T> p) {
  const int col = blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= p.OC) return;
  float acc = 0.f;
  for (int c = 0; c < p.chunks; ++c) acc += p.partials[static_cast<size_t>(c) * p.OC + col];
  p.dbias[col] = from_f32<T>(to_f32(p.dbias[col]) + acc);
}

void check_shape(const char* who, int N, int C, int OC) {
  REMAT_CHECK(N >= 0 && C > 0 && OC > 0, std::string(who) + ": bad shape N=" + std::to_string(N) +
                                             " C=" + std::to_string(C) +
                                             " OC=" + std::to_string(OC));
}

}  // namespace

template <typename Elem>
void matmul_forward(Elem* out, const Elem* inp, const Elem* w, const Elem* bias, int N, int C,
                    int OC, cudaStream_t stream, Elem* pre_gelu) {
  check_shape("matmul_forward", N, C, OC);
  if (N == 0) return;
  REMAT_CHECK(out && inp && w, "matmul_forward: null pointer");
  REMAT_CHECK(pre_gelu == nullptr || OC % 8 == 0,
              "matmul_forward: the GeLU epilogue needs OC % 8 == 0, got " + std::to_string(OC));
  NvtxRange range(pre_gelu ? "matmul_forward_gelu" : "matmul_forward");
  Gemm g{true,
         false,
         OC,
         N,
         C,
         w,
         C,
         inp,
         C,
         out,
         OC,
         0.f,
         CUBLASLT_EPILOGUE_DEFAULT,
         bias,
         nullptr,
         dtype_of<Elem>()};
  if (pre_gelu) {
    g.epi = bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    g.aux = pre_gelu;
    if (run_gemm(g, stream)) {
      last_gelu_fusion = GeluFusion::kEpilogue;
      return;
    }
    // Fallback: pre_gelu = GEMM (+ bias), then out = gelu(pre_gelu).
    last_gelu_fusion = GeluFusion::kFallback;
    g.D = pre_gelu;
    g.aux = nullptr;
  }
  g.epi = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  if (!run_gemm(g, stream)) {
    REMAT_CHECK(bias != nullptr, "matmul_forward: cuBLASLt found no algorithm");
    g.epi = CUBLASLT_EPILOGUE_DEFAULT;
    g.bias = nullptr;
    REMAT_CHECK(run_gemm(g, stream), "matmul_forward: cuBLASLt found no algorithm");
    const BiasParams<Elem> bp{static_cast<Elem*>(g.D), bias, N, OC};
    add_bias_kernel<Elem>
        <<<std::min(ceil_div(static_cast<long>(N) * OC, 256), 65535), 256, 0, stream>>>(bp);
    REMAT_CUDA_LAUNCH_CHECK(stream);
  }
  if (pre_gelu) gelu_forward(out, pre_gelu, static_cast<size_t>(N) * OC, stream);
}

template <typename Elem>
void matmul_backward(Elem* dinp, Elem* dw, Elem* dbias, const Elem* dout, const Elem* inp,
                     const Elem* w, int N, int C, int OC, cudaStream_t stream,
                     const Elem* pre_gelu) {
  check_shape("matmul_backward", N, C, OC);
  if (N == 0) return;
  REMAT_CHECK(dout && (dinp == nullptr || w) && (dw == nullptr || inp),
              "matmul_backward: null pointer");
  REMAT_CHECK(pre_gelu == nullptr || C % 8 == 0,
              "matmul_backward: the DGELU epilogue needs C % 8 == 0, got " + std::to_string(C));
  REMAT_CHECK(dbias == nullptr || OC <= kMaxBiasCols,
              "matmul_backward: bias gradient supports OC <= 16384, got " + std::to_string(OC));
  NvtxRange range("matmul_backward");
  if (dinp) {
    Gemm g{false,
           false,
           C,
           N,
           OC,
           w,
           C,
           dout,
           OC,
           dinp,
           C,
           0.f,
           CUBLASLT_EPILOGUE_DEFAULT,
           nullptr,
           nullptr,
           dtype_of<Elem>()};
    bool fused = false;
    if (pre_gelu) {
      g.epi = CUBLASLT_EPILOGUE_DGELU;
      g.aux = const_cast<Elem*>(pre_gelu);  // read only for DGELU
      fused = run_gemm(g, stream);
      last_gelu_fusion = fused ? GeluFusion::kEpilogue : GeluFusion::kFallback;
      g.epi = CUBLASLT_EPILOGUE_DEFAULT;
      g.aux = nullptr;
    }
    if (!fused) {
      REMAT_CHECK(run_gemm(g, stream), "matmul_backward: cuBLASLt found no algorithm (dinp)");
      if (pre_gelu) gelu_backward(dinp, pre_gelu, dinp, static_cast<size_t>(N) * C, stream);
    }
  }
  if (dw) {
    const Gemm g{false,
                 true,
                 C,
                 OC,
                 N,
                 inp,
                 C,
                 dout,
                 OC,
                 dw,
                 C,
                 1.f,
                 CUBLASLT_EPILOGUE_DEFAULT,
                 nullptr,
                 nullptr,
                 dtype_of<Elem>()};
    REMAT_CHECK(run_gemm(g, stream), "matmul_backward: cuBLASLt found no algorithm (dw)");
  }
  if (dbias) {
    cublasLtHandle_t handle;
    char* ws = static_cast<char*>(workspace_for(stream, &handle));
    const int chunks = std::min(kBiasChunks, N);
    const DbiasParams<Elem> p{dbias, reinterpret_cast<float*>(ws + kLtWorkspaceBytes), dout, N, OC,
                              chunks};
    dbias_partial_kernel<Elem><<<dim3(ceil_div(OC, 128), chunks), 128, 0, stream>>>(p);
    REMAT_CUDA_LAUNCH_CHECK(stream);
    dbias_final_kernel<Elem><<<ceil_div(OC, 128), 128, 0, stream>>>(p);
    REMAT_CUDA_LAUNCH_CHECK(stream);
  }
}

template <typename Elem>
void gemm(cpu::Trans ta, cpu::Trans tb, int M, int N, int K, const Elem* A, int lda, const Elem* B,
          int ldb, float beta, Elem* C, int ldc, cudaStream_t stream) {
  REMAT_CHECK(M >= 0 && N >= 0 && K >= 0, "gemm: negative size");
  REMAT_CHECK(beta == 0.f || beta == 1.f, "gemm: beta must be 0 or 1");
  if (M == 0 || N == 0) return;
  REMAT_CHECK(A && B && C, "gemm: null pointer");
  const bool a_t = ta == cpu::Trans::kYes, b_t = tb == cpu::Trans::kYes;
  REMAT_CHECK(lda >= (a_t ? M : K) && ldb >= (b_t ? K : N) && ldc >= N,
              "gemm: leading dimension too small");
  NvtxRange range("gemm");
  // Row-major C (M, N) is column-major C^T (N, M) = op(B)^T op(A)^T.
  const Gemm g{b_t,
               a_t,
               N,
               M,
               K,
               B,
               ldb,
               A,
               lda,
               C,
               ldc,
               beta,
               CUBLASLT_EPILOGUE_DEFAULT,
               nullptr,
               nullptr,
               dtype_of<Elem>()};
  if (K == 0) {
    REMAT_CHECK(beta == 1.f, "gemm: K == 0 with beta == 0 is not supported");
    return;
  }
  REMAT_CHECK(run_gemm(g, stream), "gemm: cuBLASLt found no algorithm");
}

void matmul_release_workspace(cudaStream_t stream) {
  void* ws = nullptr;
  {
    Lt& s = lt();
    std::lock_guard<std::mutex> lk(s.mu);
    const auto it = s.workspaces.find(stream);
    if (it == s.workspaces.end()) return;
    ws = it->second;
    s.workspaces.erase(it);
  }
  // The stream's last GEMM may still be running: free after it.
  cudaError_t err = cudaStreamSynchronize(stream);
  if (err == cudaSuccess) err = cudaFree(ws);
  if (err != cudaSuccess)
    std::fprintf(stderr, "remat: releasing a cuBLASLt workspace failed: %s\n",
                 cudaGetErrorString(err));
}

void matmul_release_workspaces() {
  Lt& s = lt();
  std::lock_guard<std::mutex> lk(s.mu);
  for (auto& kv : s.workspaces) REMAT_CUDA_CHECK(cudaFree(kv.second));
  s.workspaces.clear();
}

GeluFusion matmul_last_gelu_fusion() {
  return last_gelu_fusion;
}

#define REMAT_INSTANTIATE(E)                                                                     \
  template void matmul_forward<E>(E*, const E*, const E*, const E*, int, int, int, cudaStream_t, \
                                  E*);                                                           \
  template void matmul_backward<E>(E*, E*, E*, const E*, const E*, const E*, int, int, int,      \
                                   cudaStream_t, const E*);                                      \
  template void gemm<E>(cpu::Trans, cpu::Trans, int, int, int, const E*, int, const E*, int,     \
                        float, E*, int, cudaStream_t);
REMAT_INSTANTIATE(float)
REMAT_INSTANTIATE(__nv_bfloat16)
#undef REMAT_INSTANTIATE

}  // namespace remat::cuda
