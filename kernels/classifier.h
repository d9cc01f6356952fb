// Fused classifier: logits = x @ wte^T, softmax cross-entropy and its gradient, processed in
// row chunks so the (N, Vp) logits never exist at once. Only the first V of the Vp padded
// columns take part: padded entries never receive probability.
#pragma once

namespace remat::cpu {

// Scratch the call needs, in floats: chunk_rows * Vp.
inline long classifier_workspace_floats(int chunk_rows, int Vp) {
  return static_cast<long>(chunk_rows) * Vp;
}

// losses (N) overwritten with -log p(target). Returns the mean over the N rows (double sum).
// When dx is not null, also the backward of (dloss * sum of losses):
//   dx (N, C) = dlogits @ wte (overwritten), dwte (Vp, C) += dlogits^T @ x.
// targets must already be checked < V. workspace: classifier_workspace_floats(chunk_rows, Vp).
float classifier_forward_backward(float* losses, float* dx, float* dwte, const float* x,
                                  const float* wte, const int* targets, int N, int C, int V, int Vp,
                                  float dloss, float* workspace, int chunk_rows);

// Logits of one row set without the loss (sampling): logits (N, Vp) overwritten, columns
// >= V set to -inf.
void classifier_logits(float* logits, const float* x, const float* wte, int N, int C, int V,
                       int Vp);

}  // namespace remat::cpu

#ifdef REMAT_WITH_CUDA
// ---- CUDA backend ----
// Launchers enqueue on `stream` and return at once (no host synchronization). Elem is float
// (exact-comparison mode) or __nv_bfloat16 (training); only those two are instantiated.
// Every pointer is device memory. Shape errors throw remat::Error before anything is enqueued.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

namespace remat::cuda {

// Scratch elements (of Elem) classifier_forward_backward needs: chunk_rows * Vp.
inline size_t classifier_workspace_elems(int chunk_rows, int Vp) {
  return static_cast<size_t>(chunk_rows) * Vp;
}

// Per chunk of rows: logits = x @ wte[:V]^T (cuBLASLt) into workspace; one fused kernel per
// row computes max, log-sum-exp, the loss and (when dx is not null) dlogits = dloss *
// (softmax - onehot) in place; then dx (chunk, C) = dlogits @ wte[:V] (overwritten) and
// dwte[:V] (V, C) += dlogits^T @ x_chunk. Padded rows of wte and dwte are never touched.
// Chunks run in order on `stream`.
// losses (N) fp32 overwritten. mean_loss (device scalar), when not null, = mean of losses
// (fixed-order reduction). targets (N) on the device, each < V (unchecked).
template <typename Elem>
void classifier_forward_backward(float* losses, Elem* dx, Elem* dwte, const Elem* x,
                                 const Elem* wte, const int* targets, int N, int C, int V, int Vp,
                                 float dloss, Elem* workspace, int chunk_rows, cudaStream_t stream,
                                 float* mean_loss = nullptr);

// logits (N, Vp) = x @ wte[:V]^T overwritten, columns >= V set to -inf.
template <typename Elem>
void classifier_logits(Elem* logits, const Elem* x, const Elem* wte, int N, int C, int V, int Vp,
                       cudaStream_t stream);

}  // namespace remat::cuda
#endif  // REMAT_WITH_CUDA
