// Linear layer: out = inp @ w^T + bias, weights stored (OC, C) as in llm.c / GPT-2.
#pragma once

namespace remat::cpu {

// out (N, OC) = inp (N, C) @ w (OC, C)^T + bias (OC). bias may be null. out is overwritten.
void matmul_forward(float* out, const float* inp, const float* w, const float* bias, int N, int C,
                    int OC);

// dinp (N, C)  = dout (N, OC) @ w (OC, C)       (overwritten; skipped when dinp is null)
// dw   (OC, C) += dout^T @ inp                   (accumulated)
// dbias (OC)  += sum over rows of dout           (accumulated; skipped when null)
void matmul_backward(float* dinp, float* dw, float* dbias, const float* dout, const float* inp,
                     const float* w, int N, int C, int OC);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include "kernels/gemm.h"

namespace remat::cuda {

// cuBLASLt GEMMs (fp32 accumulation; the fp32 mode is true fp32, no TF32). Each stream gets
// its own cuBLASLt workspace, allocated on the stream's first GEMM and kept until
// matmul_release_workspace(stream) (a CudaStream calls it when destroyed) or
// matmul_release_workspaces(). The heuristic is told each operand's alignment.

// out (N, OC) = inp (N, C) @ w (OC, C)^T + bias (OC); bias may be null. out is overwritten.
// With pre_gelu (N, OC) not null: pre_gelu = inp @ w^T + bias and out = gelu(pre_gelu)
// (cuBLASLt GELU_AUX epilogue; falls back to a GeLU kernel when no algorithm supports it).
template <typename Elem>
void matmul_forward(Elem* out, const Elem* inp, const Elem* w, const Elem* bias, int N, int C,
                    int OC, cudaStream_t stream, Elem* pre_gelu = nullptr);

// dinp (N, C)  = dout (N, OC) @ w (OC, C)   (overwritten; skipped when dinp is null)
// dw   (OC, C) += dout^T @ inp               (accumulated; skipped when dw is null)
// dbias (OC)  += column sums of dout         (accumulated, fp32 partials summed in a fixed
//                                             order; skipped when null)
// With pre_gelu (N, C) not null, dinp = gelu'(pre_gelu) * (dout @ w) (DGELU epilogue, or a
// GeLU-backward kernel as fallback): the gradient through a GeLU that produced inp.
template <typename Elem>
void matmul_backward(Elem* dinp, Elem* dw, Elem* dbias, const Elem* dout, const Elem* inp,
                     const Elem* w, int N, int C, int OC, cudaStream_t stream,
                     const Elem* pre_gelu = nullptr);

// General row-major GEMM on cuBLASLt (the classifier's building block):
// C (M, N) = op(A) (M, K) @ op(B) (K, N) + beta * C, with row strides lda, ldb, ldc;
// beta is 0 (C written without being read) or 1 (accumulated).
template <typename Elem>
void gemm(cpu::Trans ta, cpu::Trans tb, int M, int N, int K, const Elem* A, int lda, const Elem* B,
          int ldb, float beta, Elem* C, int ldc, cudaStream_t stream);

// Frees `stream`'s workspace, if it has one, after the stream's work; call before destroying
// a stream that ran GEMMs (no GEMM may be enqueued on it meanwhile). Never throws (destructors
// call it): an error is printed on stderr.
void matmul_release_workspace(cudaStream_t stream);

// Frees every stream's workspace. Call with all streams idle (e.g. before exit).
void matmul_release_workspaces();

// How a GeLU-fused matmul_forward / matmul_backward (pre_gelu set) ran: in the cuBLASLt
// epilogue (GELU_AUX / DGELU: GeLU of the fp32 accumulator, cuBLASLt's own GeLU) or, where
// cuBLASLt offers no algorithm for it, as the plain GEMM then the GeLU kernel (kernels/gelu.h)
// on the stored pre-activation. matmul_last_gelu_fusion() tells the last such call's way on
// this host thread (kNone before any); tests and benchmarks report it.
enum class GeluFusion { kNone, kEpilogue, kFallback };
GeluFusion matmul_last_gelu_fusion();

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
