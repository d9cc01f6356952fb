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
                                  const float* wte, const int* targets, int N, int C, int V,
                                  int Vp, float dloss, float* workspace, int chunk_rows);

// Logits of one row set without the loss (sampling): logits (N, Vp) overwritten, columns
// >= V set to -inf.
void classifier_logits(float* logits, const float* x, const float* wte, int N, int C, int V,
                       int Vp);

}  // namespace remat::cpu
