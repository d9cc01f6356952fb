// GPT-2 written once on the program builder (runtime/program.h): its forward pass and its
// parameters in llm.c's layout. The runtime executes the program (runtime/executor.h).
#pragma once
#include <memory>

#include "io/config.h"
#include "runtime/program.h"

namespace remat {

// GPT-2's forward at (B, T). Block l's saved tensors: ln1 (LayerNorm 1 and its mean, rstd),
// qkv, attn (attention output and log-sum-exp), r2 (the mid-block residual), ln2, fch (GeLU
// input), gelu; its input x (the residual stream) is a checkpoint. The residual add at a
// block boundary is fused with the next LayerNorm (ln1 of the next block, or the final one).
std::shared_ptr<const Program> gpt2_program(const ModelConfig& c, int B, int T);

}  // namespace remat
