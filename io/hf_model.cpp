#include "io/hf_model.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>

#include "base/error.h"
#include "io/hf_config.h"
#include "io/params.h"
#include "io/safetensors.h"

namespace remat {
namespace {

std::vector<HFBinding> llama_bindings(const ModelConfig& c) {
  std::vector<HFBinding> b;
  const size_t C = c.channels, V = c.vocab_size, HD = c.head_dim();
  const size_t q = size_t(c.num_heads) * HD, kv = size_t(c.kv_heads()) * HD;
  const size_t F = c.mlp_width();
  for (const ParamTensor& t : param_table(c)) {
    auto add = [&](const std::string& name, size_t row0, size_t rows) {
      HFBinding h;
      h.name = name;
      h.offset = t.offset + row0 * t.cols;
      h.rows = rows;
      h.cols = t.cols;
      h.vector = t.cols == 1;
      b.push_back(h);
    };
    const std::string& n = t.name;
    const size_t dot = n.find(".self_attn.qkv_proj.");
    const size_t mlp = n.find(".mlp.gate_up_proj.");
    if (n == "embed_tokens.weight") {
      add("model.embed_tokens.weight", 0, V);
    } else if (n == "lm_head.weight") {
      add("lm_head.weight", 0, V);
    } else if (n == "norm.weight") {
      add("model.norm.weight", 0, C);
    } else if (dot != std::string::npos) {
      const std::string pre = "model." + n.substr(0, dot) + ".self_attn.";
      const std::string kind = n.substr(dot + std::strlen(".self_attn.qkv_proj."));  // weight|bias
      add(pre + "q_proj." + kind, 0, q);
      add(pre + "k_proj." + kind, q, kv);
      add(pre + "v_proj." + kind, q + kv, kv);
    } else if (mlp != std::string::npos) {
      const std::string pre = "model." + n.substr(0, mlp) + ".mlp.";
      add(pre + "gate_proj.weight", 0, F);
      add(pre + "up_proj.weight", F, F);
    } else {
      add("model." + n, 0, t.rows);
    }
  }
  return b;
}

// GPT-2 in Hugging Face's GPT2LMHeadModel names; llm.c's kinds hold all layers, so each
// layer's slice is one binding. c_attn, c_proj and c_fc are Conv1D: stored (in, out).
std::vector<HFBinding> gpt2_bindings(const ModelConfig& c) {
  std::vector<HFBinding> b;
  const size_t C = c.channels, L = c.num_layers;
  const auto off = param_offsets(c);
  const auto size = param_sizes(c);
  auto whole = [&](int k, const std::string& name, size_t rows, size_t cols) {
    HFBinding h;
    h.name = "transformer." + name;
    h.offset = off[k];
    h.rows = rows;
    h.cols = cols;
    h.vector = cols == 1;
    b.push_back(h);
  };
  whole(0, "wte.weight", c.vocab_size, C);
  whole(1, "wpe.weight", c.max_seq_len, C);
  struct Kind {
    int k;
    const char* name;
    size_t rows, cols;
    bool transpose;
  };
  const Kind kinds[] = {
      {2, "ln_1.weight", C, 1, false},           {3, "ln_1.bias", C, 1, false},
      {4, "attn.c_attn.weight", 3 * C, C, true}, {5, "attn.c_attn.bias", 3 * C, 1, false},
      {6, "attn.c_proj.weight", C, C, true},     {7, "attn.c_proj.bias", C, 1, false},
      {8, "ln_2.weight", C, 1, false},           {9, "ln_2.bias", C, 1, false},
      {10, "mlp.c_fc.weight", 4 * C, C, true},   {11, "mlp.c_fc.bias", 4 * C, 1, false},
      {12, "mlp.c_proj.weight", C, 4 * C, true}, {13, "mlp.c_proj.bias", C, 1, false},
  };
  for (size_t l = 0; l < L; l++) {
    for (const Kind& k : kinds) {
      HFBinding h;
      h.name = "transformer.h." + std::to_string(l) + "." + k.name;
      h.offset = off[k.k] + l * (size[k.k] / L);
      h.rows = k.rows;
      h.cols = k.cols;
      h.vector = k.cols == 1;
      h.transpose = k.transpose;
      b.push_back(h);
    }
  }
  whole(14, "ln_f.weight", C, 1);
  whole(15, "ln_f.bias", C, 1);
  return b;
}

std::string join(const std::string& dir, const std::string& name) {
  return dir.empty() || dir.back() == '/' ? dir + name : dir + "/" + name;
}

}  // namespace

std::vector<HFBinding> hf_bindings(const ModelConfig& c) {
  return c.is_llama() ? llama_bindings(c) : gpt2_bindings(c);
}

bool is_hf_model_dir(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 || !S_ISDIR(st.st_mode)) return false;
  return ::stat(join(path, "config.json").c_str(), &st) == 0;
}

namespace {

// remat's configuration for a config.json, or an Error naming it and what remat cannot run.
ModelConfig config_from_hf(const HFConfig& h, const std::string& path) {
  auto refuse = [&](const std::string& why) {
    throw Error(path + ": " + h.model_type + " model remat cannot train: " + why);
  };
  ModelConfig c;
  c.model_type = h.model_type;
  c.num_layers = h.num_hidden_layers;
  c.num_heads = h.num_attention_heads;
  c.channels = h.hidden_size;
  c.vocab_size = h.vocab_size;
  c.padded_vocab = pad_vocab(h.vocab_size);
  c.max_seq_len = h.max_position_embeddings;
  if (h.head_dim != 0 && int64_t(h.head_dim) * h.num_attention_heads != h.hidden_size)
    refuse("head_dim " + std::to_string(h.head_dim) + " times " +
           std::to_string(h.num_attention_heads) + " heads is not hidden_size " +
           std::to_string(h.hidden_size));
  if (h.model_type == "gpt2") {
    c.family = Family::kGPT2;
    if (h.intermediate_size != 0 && h.intermediate_size != 4 * h.hidden_size)
      refuse("n_inner " + std::to_string(h.intermediate_size) + " is not 4 * n_embd");
    if (std::fabs(h.norm_eps - 1e-5) > 1e-12)
      refuse("layer_norm_epsilon " + std::to_string(h.norm_eps) + " (remat's LayerNorm uses 1e-5)");
    if (!h.scale_attn_weights || h.scale_attn_by_inverse_layer_idx)
      refuse("attention scaled other than by 1/sqrt(head_dim)");
    return c;
  }
  c.family = Family::kLlama;
  c.num_kv_heads = h.num_key_value_heads > 0 ? h.num_key_value_heads : h.num_attention_heads;
  c.intermediate = h.intermediate_size;
  c.norm_eps = static_cast<float>(h.norm_eps);
  c.rope_theta = static_cast<float>(h.rope_theta);
  c.qkv_bias = h.qkv_bias;
  c.tied_embeddings = h.tie_word_embeddings;
  if (c.intermediate <= 0) refuse("intermediate_size must be positive");
  if (h.o_bias) refuse("a bias on o_proj (attention_bias) is not supported; q/k/v biases are");
  if (h.mlp_bias) refuse("MLP biases (mlp_bias) are not supported");
  if (!h.rope_scaling_type.empty() && h.rope_scaling_type != "linear" &&
      h.rope_scaling_type != "llama3")
    refuse("rope_scaling of type '" + h.rope_scaling_type +
           "' is not supported (none, linear and llama3 are)");
  c.rope_scaling = h.rope_scaling_type;
  if (!c.rope_scaling.empty()) {
    c.rope_factor = static_cast<float>(h.rope_scaling_factor);
    if (c.rope_scaling == "llama3") {
      c.rope_low_freq_factor = static_cast<float>(h.rope_low_freq_factor);
      c.rope_high_freq_factor = static_cast<float>(h.rope_high_freq_factor);
      c.rope_original_max_pos = h.rope_original_max_position_embeddings;
    }
  }
  // A window at least as long as the sequence is full attention: the longest sequence remat
  // accepts for this model is the window, so nothing it runs needs the sliding window.
  if (h.sliding_window > 0 && h.sliding_window < c.max_seq_len) c.max_seq_len = h.sliding_window;
  return c;
}

HFConfig hf_from_config(const ModelConfig& c) {
  HFConfig h;
  h.model_type = c.model_type;
  h.vocab_size = c.vocab_size;
  h.hidden_size = c.channels;
  h.num_hidden_layers = c.num_layers;
  h.num_attention_heads = c.num_heads;
  h.max_position_embeddings = c.max_seq_len;
  h.head_dim = c.head_dim();
  h.intermediate_size = c.mlp_width();
  h.torch_dtype = "float32";
  if (c.is_llama()) {
    h.num_key_value_heads = c.kv_heads();
    h.norm_eps = c.norm_eps;
    h.rope_theta = c.rope_theta;
    h.hidden_act = "silu";
    h.tie_word_embeddings = c.tied_embeddings;
    h.qkv_bias = c.qkv_bias;
    h.rope_scaling_type = c.rope_scaling;
    if (!c.rope_scaling.empty()) h.rope_scaling_factor = c.rope_factor;
    if (c.rope_scaling == "llama3") {
      h.rope_low_freq_factor = c.rope_low_freq_factor;
      h.rope_high_freq_factor = c.rope_high_freq_factor;
      h.rope_original_max_position_embeddings = c.rope_original_max_pos;
    }
    if (c.model_type == "qwen2") h.max_window_layers = c.num_layers;
  } else {
    h.num_key_value_heads = c.num_heads;
    h.norm_eps = 1e-5;
    h.hidden_act = "gelu_new";
    h.tie_word_embeddings = true;
    h.qkv_bias = h.o_bias = h.mlp_bias = true;
  }
  return h;
}

bool ignorable(const std::string& name, const ModelConfig& c) {
  auto ends = [&](const char* suffix) {
    const size_t n = std::strlen(suffix);
    return name.size() >= n && name.compare(name.size() - n, n, suffix) == 0;
  };
  // Buffers some exporters save: GPT-2's causal masks, rotary frequency tables, and the tied
  // output embedding stored a second time.
  if (ends(".attn.bias") || ends(".attn.masked_bias") || ends("rotary_emb.inv_freq")) return true;
  return name == "lm_head.weight" && c.tied_embeddings;
}

}  // namespace

ModelConfig read_hf_model_config(const std::string& dir) {
  const std::string config_path = join(dir, "config.json");
  ModelConfig c = config_from_hf(read_hf_config(config_path), config_path);
  check_config(c, config_path);
  return c;
}

HFModel load_hf_model(const std::string& dir) {
  HFModel m;
  m.config = read_hf_model_config(dir);
  const SafetensorsCheckpoint ck(dir);
  const std::vector<HFBinding> binds = hf_bindings(m.config);
  // GPT-2 files from the original release name tensors without the "transformer." prefix.
  const bool bare =
      !m.config.is_llama() && !ck.contains("transformer.wte.weight") && ck.contains("wte.weight");
  m.params.assign(num_params(m.config), 0.0f);
  std::vector<char> used;
  std::vector<std::string> names = ck.names();
  used.assign(names.size(), 0);
  std::vector<float> tmp;
  for (const HFBinding& b : binds) {
    const std::string name = bare ? b.name.substr(std::strlen("transformer.")) : b.name;
    if (!ck.contains(name))
      throw Error(ck.path() + ": missing tensor " + name + " (config.json describes a " +
                  m.config.model_type + " with " + std::to_string(m.config.num_layers) +
                  " layers)");
    const TensorInfo& t = ck.at(name);
    const std::vector<int64_t> want =
        b.vector ? std::vector<int64_t>{int64_t(b.rows)}
                 : (b.transpose ? std::vector<int64_t>{int64_t(b.cols), int64_t(b.rows)}
                                : std::vector<int64_t>{int64_t(b.rows), int64_t(b.cols)});
    if (t.shape != want)
      throw Error(ck.file_of(name).path() + ": tensor " + name + " has shape " +
                  shape_string(t.shape) + " but config.json needs " + shape_string(want));
    if (t.dtype != TensorDType::kF32 && t.dtype != TensorDType::kBF16 &&
        t.dtype != TensorDType::kF16 && t.dtype != TensorDType::kF64)
      throw Error(ck.file_of(name).path() + ": tensor " + name + " has dtype " +
                  dtype_name(t.dtype) + "; a model's weights must be F32, BF16, F16 or F64");
    float* dst = m.params.data() + b.offset;
    const size_t n = b.rows * b.cols;
    if (b.transpose) {
      tmp.resize(n);
      ck.read_f32(name, tmp.data(), n);
      for (size_t i = 0; i < b.cols; i++)
        for (size_t j = 0; j < b.rows; j++) dst[j * b.cols + i] = tmp[i * b.rows + j];
    } else {
      ck.read_f32(name, dst, n);
    }
    used[std::lower_bound(names.begin(), names.end(), name) - names.begin()] = 1;
  }
  for (size_t i = 0; i < names.size(); i++)
    if (!used[i] && !ignorable(names[i], m.config))
      throw Error(ck.path() + ": holds tensor " + names[i] + ", which a " + m.config.model_type +
                  " model with this config.json does not have (does config.json belong to "
                  "these weights?)");
  return m;
}

void save_hf_model(const std::string& dir, const ModelConfig& c, const float* params) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST)
    throw Error(dir + ": cannot create the model directory: " + std::strerror(errno));
  std::vector<TensorToWrite> tensors;
  std::vector<std::vector<float>> transposed;
  const std::vector<HFBinding> binds = hf_bindings(c);
  transposed.reserve(binds.size());
  for (const HFBinding& b : binds) {
    TensorToWrite t;
    t.name = b.name;
    const float* src = params + b.offset;
    if (b.vector) {
      t.shape = {int64_t(b.rows)};
      t.data = src;
    } else if (b.transpose) {
      t.shape = {int64_t(b.cols), int64_t(b.rows)};
      std::vector<float> tr(b.rows * b.cols);
      for (size_t i = 0; i < b.cols; i++)
        for (size_t j = 0; j < b.rows; j++) tr[i * b.rows + j] = src[j * b.cols + i];
      transposed.push_back(std::move(tr));
      t.data = transposed.back().data();
    } else {
      t.shape = {int64_t(b.rows), int64_t(b.cols)};
      t.data = src;
    }
    tensors.push_back(std::move(t));
  }
  write_safetensors_checkpoint(dir, tensors);
  write_hf_config(join(dir, "config.json"), hf_from_config(c));
}

}  // namespace remat
