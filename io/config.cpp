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
}  // namespace

GPT2Config preset_config(const std::string& name, int vocab) {
  for (const Preset& p : kPresets) {
    if (name != p.name) continue;
    // pad_vocab rounds up to a multiple of 128 in int: larger values would overflow.
    constexpr int kMaxVocab = INT_MAX / 128 * 128;
    if (vocab > kMaxVocab)
      throw Error("vocabulary size " + std::to_string(vocab) + " is too large (at most " +
                  std::to_string(kMaxVocab) + ")");
    GPT2Config c;
    c.num_layers = p.L;
    c.num_heads = p.NH;
    c.channels = p.C;
    c.max_seq_len = p.maxT;
    c.vocab_size = vocab > 0 ? vocab : 50257;
    c.padded_vocab = pad_vocab(c.vocab_size);
    return c;
  }
  std::string known;
  for (const Preset& p : kPresets) known += std::string(known.empty() ? "" : ", ") + p.name;
  throw Error("unknown model preset '" + name + "' (known: " + known + ")");
}

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const Preset& p : kPresets) names.emplace_back(p.name);
  return names;
}

bool is_small_preset(const std::string& name) {
  for (const Preset& p : kPresets)
    if (name == p.name) return p.small;
  return false;
}

}  // namespace remat
