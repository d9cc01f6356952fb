// Model parameters in one flat fp32 buffer; gradients and AdamW moments use the same layout.
// GPT-2: llm.c's order and layout, tensors by kind, each kind holding all layers
// contiguously. The Llama family: block by block, each block's tensors together (below).
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"

namespace remat {

// One tensor of the flat buffer: rows x cols floats at offset (cols 1 for a vector).
struct ParamTensor {
  std::string name;
  size_t offset = 0, rows = 0, cols = 1;
  bool decay = false;  // AdamW weight decay applies (matrices and embeddings)
  enum class Init { kNormal, kOnes, kZeros } init = Init::kNormal;
  float init_std = 0.02f;  // kNormal
  size_t count() const { return rows * cols; }
};

// Every tensor in buffer order. GPT-2: the 16 llm.c kinds below ("wte", "qkvw", ...).
// The Llama family, with Q = C + 2 NKV HD and I the MLP width:
//   embed_tokens.weight (Vp, C);
//   per block l: layers.l.input_layernorm.weight (C), layers.l.self_attn.qkv_proj.weight
//   (Q, C) = Hugging Face's q_proj, k_proj, v_proj rows one after another,
//   layers.l.self_attn.qkv_proj.bias (Q) with qkv biases, layers.l.self_attn.o_proj.weight
//   (C, C), layers.l.post_attention_layernorm.weight (C), layers.l.mlp.gate_up_proj.weight
//   (2I, C) = gate_proj then up_proj rows, layers.l.mlp.down_proj.weight (C, I);
//   norm.weight (C); lm_head.weight (Vp, C) unless the embedding is tied.
std::vector<ParamTensor> param_table(const ModelConfig& c);
// The tensor holding element `index` of the flat buffer and the index within it, as
// "name[i]" ("?" past the end).
std::string param_element_name(const ModelConfig& c, size_t index);

constexpr int kNumParamTensors = 16;

// GPT-2 only (llm.c's layout). Element counts of the 16 tensors, in file order:
// wte (Vp, C), wpe (maxT, C), ln1w (L, C), ln1b (L, C), qkvw (L, 3C, C), qkvb (L, 3C),
// attprojw (L, C, C), attprojb (L, C), ln2w (L, C), ln2b (L, C), fcw (L, 4C, C), fcb (L, 4C),
// fcprojw (L, C, 4C), fcprojb (L, C), lnfw (C), lnfb (C).
std::array<size_t, kNumParamTensors> param_sizes(const ModelConfig& c);
size_t num_params(const ModelConfig& c);  // every family
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
ParamView view_params(float* base, const ModelConfig& c);
// Offset (in floats) of each tensor within the flat buffer.
std::array<size_t, kNumParamTensors> param_offsets(const ModelConfig& c);

// GPT-2 initialisation: N(0, 0.02) for matrices and embeddings, residual projections
// (attprojw, fcprojw) scaled by 1/sqrt(2L), zero biases, LayerNorm weights 1. Rows of wte
// past V are zero. The Llama family: N(0, 0.02) for matrices and embeddings (Hugging Face's
// initializer_range), zero biases, RMSNorm weights 1, embedding and lm_head rows past V zero.
// Each tensor has its own stream of the counter-based generator. Deterministic for a seed.
void init_params(float* base, const ModelConfig& c, uint64_t seed);

}  // namespace remat
