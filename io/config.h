// GPT-2 model configuration and the named presets.
#pragma once
#include <string>
#include <vector>

namespace remat {

struct GPT2Config {
  int max_seq_len = 1024;    // maxT: rows of the position embedding
  int vocab_size = 50257;    // V: real tokens
  int padded_vocab = 50304;  // Vp: V rounded up to a multiple of 128 (rows of wte)
  int num_layers = 12;       // L
  int num_heads = 12;        // NH
  int channels = 768;        // C
};

// Rounds V up to a multiple of 128.
inline int pad_vocab(int V) {
  return (V + 127) / 128 * 128;
}

// Presets: gpt2, gpt2-medium, gpt2-large, gpt2-xl; llm.c's depth presets d12, d24, d36, d48
// (the same shapes); small presets for quick CPU training: tiny, mini, small.
// `vocab` <= 0 keeps the preset's vocabulary (50257 for GPT-2 shapes). Throws remat::Error
// naming the known presets for an unknown name.
GPT2Config preset_config(const std::string& name, int vocab = 0);
std::vector<std::string> preset_names();
// True when name is one of the small presets (their vocabulary comes from the tokenizer).
bool is_small_preset(const std::string& name);

}  // namespace remat
