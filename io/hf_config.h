// Hugging Face config.json for the model families remat reads and writes: llama, qwen2,
// mistral (the llama family: RMSNorm, RoPE, SwiGLU, grouped-query attention) and gpt2.
// Only the file: what these fields mean for remat's model lives with the model code.
#pragma once
#include <string>
#include <vector>

namespace remat {

// The fields of a config.json that decide the model's shape and math. For gpt2 the n_* keys
// fill the same fields, as transformers' GPT2Config.attribute_map does (n_embd ->
// hidden_size, n_layer -> num_hidden_layers, n_head -> num_attention_heads, n_positions ->
// max_position_embeddings, n_inner -> intermediate_size, layer_norm_epsilon -> norm_eps,
// activation_function -> hidden_act). An absent key takes transformers' default for the
// model_type, except the size keys, which are required.
struct HFConfig {
  std::string model_type;                  // "llama", "qwen2", "mistral" or "gpt2"
  std::vector<std::string> architectures;  // e.g. {"LlamaForCausalLM"}; may be empty
  int vocab_size = 0;
  int hidden_size = 0;
  int intermediate_size = 0;  // the MLP's width (gpt2: n_inner, absent or null = 4 * n_embd)
  int num_hidden_layers = 0;
  int num_attention_heads = 0;
  int num_key_value_heads = 0;  // absent: num_attention_heads (mistral: 8, as transformers)
  int head_dim = 0;             // absent or null: hidden_size / num_attention_heads
  int max_position_embeddings = 0;
  double norm_eps = 1e-6;  // rms_norm_eps (llama family, 1e-6) or layer_norm_epsilon (gpt2, 1e-5)
  std::string hidden_act;  // "silu" for the llama family; gpt2: "gelu_new" or "gelu_pytorch_tanh"
  // RoPE (llama family): rope_theta, or rope_parameters.rope_theta in newer files.
  double rope_theta = 10000;
  // rope_scaling: its "rope_type" (or older "type"), e.g. "linear", "dynamic", "llama3",
  // "yarn"; empty when rope_scaling is absent or null (or its type is "default"). The numbers
  // are 0 when absent.
  std::string rope_scaling_type;
  double rope_scaling_factor = 0;
  double rope_low_freq_factor = 0;                // llama3
  double rope_high_freq_factor = 0;               // llama3
  int rope_original_max_position_embeddings = 0;  // llama3, yarn
  bool tie_word_embeddings = false;  // default: false for the llama family, true for gpt2
  // Biases. llama: attention_bias sets q, k, v and o, mlp_bias the MLP's; qwen2: q, k and v
  // always, o and the MLP never; mistral: none; gpt2: every linear layer.
  bool qkv_bias = false;
  bool o_bias = false;
  bool mlp_bias = false;
  // Sliding-window attention, in tokens, for the layers that use it; 0 = full attention.
  // mistral: sliding_window (null = 0; absent = 4096, as transformers). qwen2: sliding_window
  // (default 4096) only when use_sliding_window is true, for layers >= max_window_layers.
  // A window at least the sequence length is full attention.
  int sliding_window = 0;
  int max_window_layers = 0;  // qwen2 (default 28); 0 otherwise
  // gpt2's attention scaling: scale_attn_weights false drops 1/sqrt(head_dim);
  // scale_attn_by_inverse_layer_idx divides by layer index + 1 as well.
  bool scale_attn_weights = true;
  bool scale_attn_by_inverse_layer_idx = false;
  std::string
      torch_dtype;  // "float32", "bfloat16", ... ("torch_dtype" or newer "dtype"); may be empty
  int bos_token_id = -1;           // -1 when absent or null
  std::vector<int> eos_token_ids;  // eos_token_id: one id or a list; empty when absent or null
  int pad_token_id = -1;

  bool is_llama_family() const {
    return model_type == "llama" || model_type == "qwen2" || model_type == "mistral";
  }
};

// The model types read and written, for messages: "llama, qwen2, mistral, gpt2".
const char* hf_supported_model_types();

// Reads and checks config.json. Errors (remat::Error) name the path and the key: a missing
// required key, a wrong JSON type, a size that is not a positive integer, heads that do not
// divide (hidden_size by num_attention_heads without head_dim, num_attention_heads by
// num_key_value_heads), an activation the family does not use, an unknown model_type (the
// message lists the supported ones).
HFConfig read_hf_config(const std::string& path);
// The same from the file's text; `path` names it in errors.
HFConfig parse_hf_config(const std::string& text, const std::string& path);

// Writes a config.json that transformers loads as it is (atomically): architectures
// (LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM, GPT2LMHeadModel), model_type, the
// sizes under the type's own keys (gpt2: n_embd, n_layer, n_head, n_positions, n_ctx,
// n_inner), hidden_act / activation_function, the norm epsilon, RoPE and rope_scaling,
// biases, sliding window, tie_word_embeddings, torch_dtype ("float32" when empty), the token
// ids that are set, dropouts 0. Errors name the path when c cannot be expressed in its type
// (e.g. a qwen2 without q/k/v biases, a gpt2 without them). Reading the file back gives c,
// but for architectures (always the type's own) and an empty torch_dtype ("float32").
void write_hf_config(const std::string& path, const HFConfig& c);
// The text write_hf_config writes.
std::string hf_config_json(const HFConfig& c, const std::string& path);

}  // namespace remat
