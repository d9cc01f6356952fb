// GPT-2 parameters in llm.c's order and layout: one flat fp32 buffer, tensors by kind, each
// kind holding all layers contiguously. Gradients and AdamW moments use the same layout.
#pragma once
#include <array>
#include <cstddef>
#include <vector>

#include "io/config.h"

namespace remat {

constexpr int kNumParamTensors = 16;

// Element counts of the 16 tensors, in file order:
// wte (Vp, C), wpe (maxT, C), ln1w (L, C), ln1b (L, C), qkvw (L, 3C, C), qkvb (L, 3C),
// attprojw (L, C, C), attprojb (L, C), ln2w (L, C), ln2b (L, C), fcw (L, 4C, C), fcb (L, 4C),
// fcprojw (L, C, 4C), fcprojb (L, C), lnfw (C), lnfb (C).
std::array<size_t, kNumParamTensors> param_sizes(const GPT2Config& c);
size_t num_params(const GPT2Config& c);
// Whether AdamW decays this tensor (the matrices: wte, wpe, qkvw, attprojw, fcw, fcprojw).
bool param_decays(int tensor);
const char* param_name(int tensor);

// Pointers into one flat buffer (parameters, gradients or moments).
struct ParamView {
  float* wte;       // (Vp, C)
  float* wpe;       // (maxT, C)
  float* ln1w;      // (L, C)
  float* ln1b;      // (L, C)
  float* qkvw;      // (L, 3C, C)
  float* qkvb;      // (L, 3C)
  float* attprojw;  // (L, C, C)
  float* attprojb;  // (L, C)
  float* ln2w;      // (L, C)
  float* ln2b;      // (L, C)
  float* fcw;       // (L, 4C, C)
  float* fcb;       // (L, 4C)
  float* fcprojw;   // (L, C, 4C)
  float* fcprojb;   // (L, C)
  float* lnfw;      // (C)
  float* lnfb;      // (C)
};
ParamView view_params(float* base, const GPT2Config& c);
// Offset (in floats) of each tensor within the flat buffer.
std::array<size_t, kNumParamTensors> param_offsets(const GPT2Config& c);

// GPT-2 initialisation: N(0, 0.02) for matrices and embeddings, residual projections
// (attprojw, fcprojw) scaled by 1/sqrt(2L), zero biases, LayerNorm weights 1. Rows of wte
// past V are zero. Deterministic for a seed.
void init_params(float* base, const GPT2Config& c, uint64_t seed);

}  // namespace remat
