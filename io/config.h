// Model configuration (GPT-2 and the Llama family: Llama, Qwen2, Mistral) and the named
// presets.
#pragma once
#include <string>
#include <vector>

namespace remat {

enum class Family {
  kGPT2,   // LayerNorm, learned positions, GeLU MLP, biases, tied embedding
  kLlama,  // RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention
};

struct ModelConfig {
  Family family = Family::kGPT2;
  // Hugging Face's model_type: gpt2, llama, qwen2 or mistral (what a saved config.json says).
  std::string model_type = "gpt2";
  int max_seq_len = 1024;    // maxT: rows of the position embedding (GPT-2), longest T
  int vocab_size = 50257;    // V: real tokens
  int padded_vocab = 50304;  // Vp: V rounded up to a multiple of 128 (rows of wte)
  int num_layers = 12;       // L
  int num_heads = 12;        // NH
  int channels = 768;        // C
  // The Llama family (GPT-2 keeps these defaults).
  int num_kv_heads = 0;         // NKV (grouped-query attention); 0 = num_heads
  int intermediate = 0;         // MLP hidden width I; 0 = 4 C (GPT-2)
  float norm_eps = 1e-5f;       // LayerNorm / RMSNorm epsilon
  float rope_theta = 10000.0f;  // rotary base
  bool qkv_bias = true;         // biases on the q, k, v projections (GPT-2, Qwen2)
  bool tied_embeddings = true;  // the classifier reads the token embedding
  // Rope scaling (Hugging Face's rope_scaling): "" none, "linear" (every frequency divided by
  // rope_factor) or "llama3" (Llama 3.1/3.2: low frequencies divided by rope_factor, high ones
  // kept, a smooth blend between, by the wavelengths against rope_original_max_pos).
  std::string rope_scaling;
  float rope_factor = 1.0f, rope_low_freq_factor = 1.0f, rope_high_freq_factor = 4.0f;
  int rope_original_max_pos = 0;

  int kv_heads() const { return num_kv_heads > 0 ? num_kv_heads : num_heads; }
  int head_dim() const { return channels / num_heads; }
  int mlp_width() const { return intermediate > 0 ? intermediate : 4 * channels; }
  // Width of the packed q, k, v projection: C + 2 NKV HD (3C without grouped-query attention).
  int qkv_width() const { return channels + 2 * kv_heads() * head_dim(); }
  bool is_llama() const { return family == Family::kLlama; }
};

// Throws remat::Error naming `where` and the problem for a shape remat cannot run (sizes not
// positive, C not a multiple of NH, NH not a multiple of NKV, an odd head dimension for RoPE).
void check_config(const ModelConfig& c, const std::string& where);
// One line: "llama L=16 C=2048 NH=32 NKV=8 I=8192 V=128256".
std::string describe(const ModelConfig& c);

// Rounds V up to a multiple of 128.
inline int pad_vocab(int V) {
  return (V + 127) / 128 * 128;
}

// Presets: gpt2, gpt2-medium, gpt2-large, gpt2-xl; llm.c's depth presets d12, d24, d36, d48
// (the same shapes); small presets for quick CPU training: tiny, mini, small (GPT-2) and
// llama-tiny, llama-mini, llama-small (Llama family with grouped-query attention); the true
// shapes of real Llama-family models for `remat plan`: llama-3.2-1b, llama-3.2-3b,
// llama-3.1-8b, tinyllama-1.1b, qwen2.5-0.5b, qwen2.5-1.5b, mistral-7b.
// `vocab` <= 0 keeps the preset's vocabulary (50257 for GPT-2 shapes). Throws remat::Error
// naming the known presets for an unknown name.
ModelConfig preset_config(const std::string& name, int vocab = 0);
std::vector<std::string> preset_names();
// True when name is one of the small presets (their vocabulary comes from the tokenizer).
bool is_small_preset(const std::string& name);

}  // namespace remat
