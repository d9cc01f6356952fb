// The Llama family (Llama, Qwen2, Mistral) written once on the program builder
// (runtime/program.h): RMSNorm fused with the residual add, rotary position embedding in
// Hugging Face's rotate-half convention, grouped-query attention, the SwiGLU MLP with gate
// and up projections in one GEMM, optional q/k/v biases (Qwen2) and a tied or separate
// output embedding. Parameters: io/params.h's layout.
#pragma once
#include <memory>

#include "io/config.h"
#include "runtime/program.h"

namespace remat {

// The forward at (B, T). Block l's saved tensors: ln1 (RMSNorm 1 and its rstd), qkvr (the
// rotated q, k and v: what attention reads; the unrotated qkv is freed at once, since the
// rotation's backward needs nothing), attn (output and log-sum-exp), r2 (the mid-block
// residual), ln2, gate_up (SwiGLU input), swiglu; its input x (the residual stream) is a
// checkpoint. The residual add at a block boundary is fused with the next RMSNorm.
std::shared_ptr<const Program> llama_program(const ModelConfig& c, int B, int T);

// The HD/2 rotation frequencies of c: Hugging Face's default 1 / theta^(2i/HD), then c's rope
// scaling as transformers computes it in fp32 (linear: divided by the factor; llama3: the
// wavelengths 2 pi / f above original_max / low_freq_factor divided by the factor, those
// below original_max / high_freq_factor kept, a linear blend between).
std::vector<float> llama_inv_freq(const ModelConfig& c);

}  // namespace remat
