#include "io/config.h"

#include <climits>

#include "base/error.h"

namespace remat {
namespace {
struct Preset {
  const char* name;
  int L, NH, C, maxT;
  bool small;
};
constexpr Preset kPresets[] = {
    {"gpt2", 12, 12, 768, 1024, false},
    {"gpt2-medium", 24, 16, 1024, 1024, false},
    {"gpt2-large", 36, 20, 1280, 1024, false},
    {"gpt2-xl", 48, 25, 1600, 1024, false},
    {"d12", 12, 12, 768, 1024, false},
    {"d24", 24, 16, 1024, 1024, false},
    {"d36", 36, 20, 1280, 1024, false},
    {"d48", 48, 25, 1600, 1024, false},
    {"tiny", 2, 2, 32, 64, true},
    {"mini", 4, 4, 128, 128, true},
    {"small", 6, 6, 192, 256, true},
};
// The Llama family: small shapes for CPU training (vocabulary from the tokenizer) and the true
// shapes of released models, from their Hugging Face config.json files.
struct LlamaPreset {
  const char* name;
  const char* model_type;
  int L, NH, NKV, C, I, V, maxT;
  float eps, theta;
  bool qkv_bias, tied, small;
};
constexpr LlamaPreset kLlamaPresets[] = {
    {"llama-tiny", "llama", 2, 4, 2, 32, 64, 0, 64, 1e-5f, 10000.0f, false, true, true},
    {"llama-mini", "llama", 4, 4, 2, 128, 352, 0, 128, 1e-5f, 10000.0f, false, true, true},
    {"llama-small", "llama", 6, 6, 2, 192, 512, 0, 256, 1e-5f, 10000.0f, false, true, true},
    {"qwen2-tiny", "qwen2", 2, 4, 2, 32, 64, 0, 64, 1e-6f, 1000000.0f, true, false, true},
    {"llama-100m", "llama", 12, 12, 4, 768, 2048, 32000, 2048, 1e-5f, 10000.0f, false, true, false},
    {"tinyllama-1.1b", "llama", 22, 32, 4, 2048, 5632, 32000, 2048, 1e-5f, 10000.0f, false, false,
     false},
    {"llama-3.2-1b", "llama", 16, 32, 8, 2048, 8192, 128256, 131072, 1e-5f, 500000.0f, false, true,
     false},
    {"llama-3.2-3b", "llama", 28, 24, 8, 3072, 8192, 128256, 131072, 1e-5f, 500000.0f, false, true,
     false},
    {"llama-3.1-8b", "llama", 32, 32, 8, 4096, 14336, 128256, 131072, 1e-5f, 500000.0f, false,
     false, false},
    {"qwen2.5-0.5b", "qwen2", 24, 14, 2, 896, 4864, 151936, 32768, 1e-6f, 1000000.0f, true, true,
     false},
    {"qwen2.5-1.5b", "qwen2", 28, 12, 2, 1536, 8960, 151936, 32768, 1e-6f, 1000000.0f, true, true,
     false},
    {"mistral-7b", "mistral", 32, 32, 8, 4096, 14336, 32768, 32768, 1e-5f, 1000000.0f, false, false,
     false},
};

std::string dims_string(const ModelConfig& c) {
  std::string s = "maxT=" + std::to_string(c.max_seq_len) + " V=" + std::to_string(c.vocab_size) +
                  " L=" + std::to_string(c.num_layers) + " NH=" + std::to_string(c.num_heads) +
                  " C=" + std::to_string(c.channels) + " Vp=" + std::to_string(c.padded_vocab);
  if (c.is_llama())
    s += " NKV=" + std::to_string(c.num_kv_heads) + " I=" + std::to_string(c.intermediate);
  return s;
}

}  // namespace

void check_config(const ModelConfig& c, const std::string& where) {
  const int dims[] = {c.max_seq_len, c.vocab_size, c.num_layers,
                      c.num_heads,   c.channels,   c.padded_vocab};
  for (int d : dims)
    if (d <= 0) throw Error(where + ": model dimensions must be positive (" + dims_string(c) + ")");
  if (c.channels % c.num_heads != 0)
    throw Error(where + ": channels C=" + std::to_string(c.channels) +
                " is not a multiple of the head count NH=" + std::to_string(c.num_heads));
  if (c.padded_vocab < c.vocab_size)
    throw Error(where + ": padded vocabulary Vp=" + std::to_string(c.padded_vocab) +
                " is smaller than the vocabulary V=" + std::to_string(c.vocab_size));
  if (c.is_llama()) {
    if (c.num_kv_heads < 0 || c.intermediate < 0)
      throw Error(where + ": model dimensions must be positive (" + dims_string(c) + ")");
    if (c.num_heads % c.kv_heads() != 0)
      throw Error(
          where + ": the head count NH=" + std::to_string(c.num_heads) +
          " is not a multiple of the key/value head count NKV=" + std::to_string(c.kv_heads()));
    if (c.head_dim() % 2 != 0)
      throw Error(where + ": the head dimension C/NH=" + std::to_string(c.head_dim()) +
                  " is odd; rotary embeddings need it even");
    if (!(c.norm_eps > 0) || !(c.rope_theta > 0))
      throw Error(where + ": the norm epsilon and the rotary base must be positive");
    if (!c.rope_scaling.empty() && c.rope_scaling != "linear" && c.rope_scaling != "llama3")
      throw Error(where + ": rope scaling '" + c.rope_scaling +
                  "' is not supported (none, linear or llama3)");
    if (!c.rope_scaling.empty() && !(c.rope_factor > 0))
      throw Error(where + ": the rope scaling factor must be positive");
    if (c.rope_scaling == "llama3" &&
        !(c.rope_original_max_pos > 0 && c.rope_high_freq_factor > c.rope_low_freq_factor &&
          c.rope_low_freq_factor > 0))
      throw Error(where +
                  ": llama3 rope scaling needs original_max_position_embeddings > 0 "
                  "and high_freq_factor > low_freq_factor > 0");
  }
  // Every factor is < 2^31, so each term (at most 4 factors plus 4 below) fits in 128 bits.
  using u128 = unsigned __int128;
  const u128 Vp = c.padded_vocab, C = c.channels, L = c.num_layers, T = c.max_seq_len;
  // mlp_width() and qkv_width() in 128 bits: on an unchecked config they may overflow int.
  const u128 I = c.intermediate > 0 ? static_cast<u128>(c.intermediate) : 4 * C;
  const u128 Q = C + 2 * static_cast<u128>(c.kv_heads()) * (C / static_cast<u128>(c.num_heads));
  const u128 total = c.is_llama() ? 2 * Vp * C + L * (Q * C + Q + C * C + 3 * I * C + 2 * C) + C
                                  : Vp * C + T * C + L * (12 * C * C + 13 * C) + 2 * C;
  const u128 limit = static_cast<u128>(1) << 60;  // elements; 4 bytes each stays below 2^63
  if (total >= limit)
    throw Error(where + ": model dimensions overflow: the parameter count of " + dims_string(c) +
                " does not fit in 64 bits");
}

std::string describe(const ModelConfig& c) {
  std::string s = c.model_type + " L=" + std::to_string(c.num_layers) +
                  " C=" + std::to_string(c.channels) + " NH=" + std::to_string(c.num_heads);
  if (c.is_llama())
    s += " NKV=" + std::to_string(c.kv_heads()) + " I=" + std::to_string(c.mlp_width());
  s += " V=" + std::to_string(c.vocab_size) + " (padded " + std::to_string(c.padded_vocab) +
       ") maxT=" + std::to_string(c.max_seq_len);
  if (c.is_llama()) {
    if (!c.rope_scaling.empty()) s += " rope-" + c.rope_scaling;
    if (c.qkv_bias) s += " qkv-bias";
    s += c.tied_embeddings ? " tied" : " untied";
  }
  return s;
}

ModelConfig preset_config(const std::string& name, int vocab) {
  for (const LlamaPreset& p : kLlamaPresets) {
    if (name != p.name) continue;
    constexpr int kMaxVocab = INT_MAX / 128 * 128;
    if (vocab > kMaxVocab)
      throw Error("vocabulary size " + std::to_string(vocab) + " is too large (at most " +
                  std::to_string(kMaxVocab) + ")");
    ModelConfig c;
    c.family = Family::kLlama;
    c.model_type = p.model_type;
    c.num_layers = p.L;
    c.num_heads = p.NH;
    c.num_kv_heads = p.NKV;
    c.channels = p.C;
    c.intermediate = p.I;
    c.max_seq_len = p.maxT;
    c.vocab_size = vocab > 0 ? vocab : (p.V > 0 ? p.V : 50257);
    c.padded_vocab = pad_vocab(c.vocab_size);
    c.norm_eps = p.eps;
    c.rope_theta = p.theta;
    c.qkv_bias = p.qkv_bias;
    c.tied_embeddings = p.tied;
    // Llama 3.1 and 3.2 stretch their rotary frequencies from an 8192-token original
    // (rope_scaling "llama3": factor 8 for 3.1, 32 for 3.2; low 1, high 4).
    const std::string n = p.name;
    if (n.rfind("llama-3.1", 0) == 0 || n.rfind("llama-3.2", 0) == 0) {
      c.rope_scaling = "llama3";
      c.rope_factor = n.rfind("llama-3.1", 0) == 0 ? 8.0f : 32.0f;
      c.rope_low_freq_factor = 1.0f;
      c.rope_high_freq_factor = 4.0f;
      c.rope_original_max_pos = 8192;
    }
    return c;
  }
  for (const Preset& p : kPresets) {
    if (name != p.name) continue;
    // pad_vocab rounds up to a multiple of 128 in int: larger values would overflow.
    constexpr int kMaxVocab = INT_MAX / 128 * 128;
    if (vocab > kMaxVocab)
      throw Error("vocabulary size " + std::to_string(vocab) + " is too large (at most " +
                  std::to_string(kMaxVocab) + ")");
    ModelConfig c;
    c.num_layers = p.L;
    c.num_heads = p.NH;
    c.channels = p.C;
    c.max_seq_len = p.maxT;
    c.vocab_size = vocab > 0 ? vocab : 50257;
    c.padded_vocab = pad_vocab(c.vocab_size);
    return c;
  }
  std::string known;
  for (const std::string& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
  throw Error("unknown model preset '" + name + "' (known: " + known + ")");
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.emplace_back(p.name);
  for (const LlamaPreset& p : kLlamaPresets) names.emplace_back(p.name);
  return names;
}

bool is_small_preset(const std::string& name) {
  for (const Preset& p : kPresets)
    if (name == p.name) return p.small;
  for (const LlamaPreset& p : kLlamaPresets)
    if (name == p.name) return p.small;
  return false;
}

}  // namespace remat
