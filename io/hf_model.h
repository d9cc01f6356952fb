// Hugging Face model directories: config.json beside model.safetensors (or shards named by
// model.safetensors.index.json), read into remat's configuration and flat parameter buffer
// (io/params.h) and written back so that `transformers` loads them as they are.
//
// Families: model_type llama, qwen2 and mistral (without sliding-window attention) as
// LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM, and gpt2 as GPT2LMHeadModel
// (whose Conv1D weights are stored transposed, (in, out)).
#pragma once
#include <string>
#include <vector>

#include "io/config.h"

namespace remat {

// One Hugging Face tensor and where it lives in the flat buffer: rows x cols floats starting
// at `offset` (row-major). A transposed tensor is stored (cols, rows) in the file. Several
// bindings may fill one remat tensor (q, k and v projections stacked into qkv).
struct HFBinding {
  std::string name;  // "model.layers.0.self_attn.q_proj.weight"
  size_t offset = 0, rows = 0, cols = 1;
  bool vector = false;     // stored 1-D, (rows)
  bool transpose = false;  // stored (cols, rows)
};
std::vector<HFBinding> hf_bindings(const ModelConfig& c);

// True when path is a directory holding config.json.
bool is_hf_model_dir(const std::string& path);

struct HFModel {
  ModelConfig config;
  std::vector<float> params;  // (num_params(config)); padded vocabulary rows zero
};
// Errors name the file and the problem: an unknown model_type, a config remat cannot run
// (sliding-window attention, rope scaling, a head_dim other than C / NH, an activation other
// than the family's), a missing tensor, or one whose dtype or shape disagrees with config.json.
HFModel load_hf_model(const std::string& dir);
// The configuration alone (DIR/config.json), checked as load_hf_model checks it.
ModelConfig read_hf_model_config(const std::string& dir);

// Writes DIR/config.json and DIR/model.safetensors (fp32), creating DIR.
void save_hf_model(const std::string& dir, const ModelConfig& c, const float* params);

}  // namespace remat
