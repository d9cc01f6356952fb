#include "io/hf_config.h"

#include <climits>
#include <cmath>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "io/atomic_file.h"

namespace remat {
namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

// One JSON object of a config file and where it came from, for messages.
class Keys {
 public:
  Keys(const json& j, std::string path, std::string prefix = "")
      : j_(j), path_(std::move(path)), prefix_(std::move(prefix)) {}

  // The value at key; nullptr when absent or null.
  const json* get(const char* key) const {
    const auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }
  bool has(const char* key) const { return get(key) != nullptr; }
  bool present(const char* key) const { return j_.contains(key); }  // null included

  [[noreturn]] void fail(const char* key, const std::string& what) const {
    throw Error(path_ + ": \"" + prefix_ + key + "\" " + what);
  }
  // A value for a message (a container by its type: dump() recurses).
  std::string got(const json& v) const {
    if (!v.is_primitive()) return std::string("a JSON ") + v.type_name();
    const std::string s = v.dump(-1, ' ', false, json::error_handler_t::replace);
    return s.size() > 40 ? s.substr(0, 40) + "..." : s;
  }

  // A positive int; required unless a default is given (def > 0).
  int size(const char* key, int def = 0) const {
    const json* v = get(key);
    if (!v) {
      if (def > 0) return def;
      fail(key, "is missing");
    }
    if (!v->is_number_integer()) fail(key, "must be a positive integer, got " + got(*v));
    // (An unsigned value above INT64_MAX reads as negative here, so it fails too.)
    if (v->get<int64_t>() <= 0 || v->get<int64_t>() > INT_MAX)
      fail(key,
           "must be a positive integer (at most " + std::to_string(INT_MAX) + "), got " + got(*v));
    return static_cast<int>(v->get<int64_t>());
  }
  // A non-negative int; def when absent or null.
  int count(const char* key, int def) const {
    const json* v = get(key);
    if (!v) return def;
    if (!v->is_number_integer() || v->get<int64_t>() < 0 || v->get<int64_t>() > INT_MAX)
      fail(key, "must be an integer >= 0, got " + got(*v));
    return static_cast<int>(v->get<int64_t>());
  }
  // A token id: >= 0, or -1 when absent or null.
  int id(const char* key) const {
    const json* v = get(key);
    if (!v) return -1;
    return id_of(key, *v);
  }
  int id_of(const char* key, const json& v) const {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT_MAX)
      fail(key, "must be a token id (an integer >= 0) or null, got " + got(v));
    return static_cast<int>(v.get<int64_t>());
  }
  // A positive finite number (integers allowed).
  double positive(const char* key, double def) const {
    const json* v = get(key);
    if (!v) return def;
    if (!v->is_number() || !(v->get<double>() > 0) || !std::isfinite(v->get<double>()))
      fail(key, "must be a positive number, got " + got(*v));
    return v->get<double>();
  }
  bool flag(const char* key, bool def) const {
    const json* v = get(key);
    if (!v) return def;
    if (!v->is_boolean()) fail(key, "must be true or false, got " + got(*v));
    return v->get<bool>();
  }
  std::string text(const char* key, const std::string& def) const {
    const json* v = get(key);
    if (!v) return def;
    if (!v->is_string()) fail(key, "must be a string, got " + got(*v));
    return v->get<std::string>();
  }
  // A nested object (nullptr when absent or null).
  const json* object(const char* key) const {
    const json* v = get(key);
    if (v && !v->is_object()) fail(key, "must be an object or null, got " + got(*v));
    return v;
  }

 private:
  const json& j_;
  std::string path_;
  std::string prefix_;
};

const char* architecture_of(const std::string& type) {
  if (type == "llama") return "LlamaForCausalLM";
  if (type == "qwen2") return "Qwen2ForCausalLM";
  if (type == "mistral") return "MistralForCausalLM";
  return "GPT2LMHeadModel";
}

bool known_type(const std::string& t) {
  return t == "llama" || t == "qwen2" || t == "mistral" || t == "gpt2";
}

void read_rope(const Keys& k, const std::string& path, HFConfig* c) {
  c->rope_theta = k.positive("rope_theta", 10000);
  // transformers 5 keeps RoPE in rope_parameters (rope_type "default" = unscaled).
  const json* params = k.object("rope_parameters");
  const json* scaling = k.object("rope_scaling");
  const char* where = "rope_scaling.";
  if (params) {
    const Keys p(*params, path, "rope_parameters.");
    c->rope_theta = p.positive("rope_theta", c->rope_theta);
    if (!scaling) {
      scaling = params;
      where = "rope_parameters.";
    }
  }
  if (!scaling) return;
  const Keys s(*scaling, path, where);
  std::string type = s.text("rope_type", s.text("type", ""));
  if (type == "default") type.clear();
  c->rope_scaling_type = type;
  if (type.empty()) return;
  c->rope_scaling_factor = s.positive("factor", 0);
  c->rope_low_freq_factor = s.positive("low_freq_factor", 0);
  c->rope_high_freq_factor = s.positive("high_freq_factor", 0);
  if (s.has("original_max_position_embeddings"))
    c->rope_original_max_position_embeddings = s.size("original_max_position_embeddings");
}

void read_llama_family(const Keys& k, const std::string& path, HFConfig* c) {
  const std::string& t = c->model_type;
  c->vocab_size = k.size("vocab_size");
  c->hidden_size = k.size("hidden_size");
  c->intermediate_size = k.size("intermediate_size");
  c->num_hidden_layers = k.size("num_hidden_layers");
  c->num_attention_heads = k.size("num_attention_heads");
  c->num_key_value_heads =
      k.size("num_key_value_heads", t == "mistral" ? 8 : c->num_attention_heads);
  c->max_position_embeddings = k.size("max_position_embeddings");
  c->norm_eps = k.positive("rms_norm_eps", 1e-6);
  c->hidden_act = k.text("hidden_act", "silu");
  if (c->hidden_act != "silu" && c->hidden_act != "swish")
    k.fail("hidden_act", "is '" + c->hidden_act + "', but " + t + " models use silu (SwiGLU)");
  c->hidden_act = "silu";  // transformers' "swish" is the same function
  read_rope(k, path, c);
  c->tie_word_embeddings = k.flag("tie_word_embeddings", false);
  if (t == "llama") {
    c->qkv_bias = c->o_bias = k.flag("attention_bias", false);
    c->mlp_bias = k.flag("mlp_bias", false);
  } else if (t == "qwen2") {
    c->qkv_bias = true;
  }
  if (t == "mistral") {
    // null: full attention; absent: MistralConfig's default.
    c->sliding_window = k.present("sliding_window") ? k.count("sliding_window", 0) : 4096;
  } else if (t == "qwen2") {
    c->max_window_layers = k.count("max_window_layers", 28);
    const bool use = k.flag("use_sliding_window", false);
    const int window = k.has("sliding_window") ? k.size("sliding_window") : 4096;
    c->sliding_window = use ? window : 0;
  }
}

void read_gpt2(const Keys& k, HFConfig* c) {
  c->vocab_size = k.size("vocab_size");
  c->hidden_size = k.size("n_embd");
  c->num_hidden_layers = k.size("n_layer");
  c->num_attention_heads = k.size("n_head");
  c->num_key_value_heads = c->num_attention_heads;
  c->max_position_embeddings =
      k.has("n_positions") || !k.has("n_ctx") ? k.size("n_positions") : k.size("n_ctx");
  c->intermediate_size = k.size("n_inner", 4 * c->hidden_size);
  c->norm_eps = k.positive("layer_norm_epsilon", 1e-5);
  c->hidden_act = k.text("activation_function", "gelu_new");
  if (c->hidden_act != "gelu_new" && c->hidden_act != "gelu_pytorch_tanh")
    k.fail("activation_function", "is '" + c->hidden_act +
                                      "'; remat's GeLU is the tanh approximation (gelu_new, "
                                      "gelu_pytorch_tanh)");
  c->tie_word_embeddings = k.flag("tie_word_embeddings", true);
  c->qkv_bias = c->o_bias = c->mlp_bias = true;
  c->scale_attn_weights = k.flag("scale_attn_weights", true);
  c->scale_attn_by_inverse_layer_idx = k.flag("scale_attn_by_inverse_layer_idx", false);
}

}  // namespace

const char* hf_supported_model_types() {
  return "llama, qwen2, mistral, gpt2";
}

HFConfig parse_hf_config(const std::string& text, const std::string& path) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    std::string m = e.what();
    const size_t tag = m.find("] ");
    if (m.rfind("[json.exception.", 0) == 0 && tag != std::string::npos) m = m.substr(tag + 2);
    throw Error(path + ": not valid JSON: " + m);
  }
  REMAT_REQUIRE(j.is_object(), path + ": not a JSON object (a config.json is one)");
  const Keys k(j, path);
  HFConfig c;
  c.model_type = k.text("model_type", "");
  if (c.model_type.empty()) k.fail("model_type", "is missing");
  if (!known_type(c.model_type))
    k.fail("model_type", "is '" + c.model_type + "', which remat does not support (supported: " +
                             hf_supported_model_types() + ")");
  if (const json* a = k.get("architectures")) {
    if (!a->is_array()) k.fail("architectures", "must be a list of strings, got " + k.got(*a));
    for (const json& s : *a) {
      if (!s.is_string()) k.fail("architectures", "must be a list of strings, got " + k.got(*a));
      c.architectures.push_back(s.get<std::string>());
    }
  }
  if (c.model_type == "gpt2")
    read_gpt2(k, &c);
  else
    read_llama_family(k, path, &c);

  if (k.has("head_dim")) {
    if (c.model_type == "gpt2" || c.model_type == "qwen2") {
      // Neither reads head_dim: it must be what they compute.
      c.head_dim = k.size("head_dim");
      if (c.head_dim * c.num_attention_heads != c.hidden_size)
        k.fail("head_dim", "is " + std::to_string(c.head_dim) + ", but " + c.model_type +
                               " models use hidden_size / num_attention_heads = " +
                               std::to_string(c.hidden_size) + " / " +
                               std::to_string(c.num_attention_heads));
    } else {
      c.head_dim = k.size("head_dim");
    }
  } else {
    const char* heads = c.model_type == "gpt2" ? "n_head" : "num_attention_heads";
    if (c.hidden_size % c.num_attention_heads != 0)
      k.fail(heads, "(" + std::to_string(c.num_attention_heads) + ") does not divide " +
                        (c.model_type == "gpt2" ? "n_embd" : "hidden_size") + " (" +
                        std::to_string(c.hidden_size) + ") and there is no head_dim");
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    k.fail("num_key_value_heads", "(" + std::to_string(c.num_key_value_heads) +
                                      ") does not divide num_attention_heads (" +
                                      std::to_string(c.num_attention_heads) + ")");

  c.torch_dtype = k.text("torch_dtype", k.text("dtype", ""));
  c.bos_token_id = k.id("bos_token_id");
  c.pad_token_id = k.id("pad_token_id");
  if (const json* e = k.get("eos_token_id")) {
    if (e->is_array()) {
      for (const json& x : *e) c.eos_token_ids.push_back(k.id_of("eos_token_id", x));
    } else {
      c.eos_token_ids.push_back(k.id_of("eos_token_id", *e));
    }
  }
  return c;
}

HFConfig read_hf_config(const std::string& path) {
  const std::vector<uint8_t> b = read_file_bytes(path);
  return parse_hf_config(std::string(b.begin(), b.end()), path);
}

std::string hf_config_json(const HFConfig& c, const std::string& path) {
  const std::string& t = c.model_type;
  REMAT_REQUIRE(known_type(t), path + ": cannot write model_type '" + t +
                                   "' (supported: " + hf_supported_model_types() + ")");
  auto need = [&](bool ok, const std::string& what) {
    REMAT_REQUIRE(ok, path + ": cannot be written as a " + t + " config.json: " + what);
  };
  need(c.vocab_size > 0 && c.hidden_size > 0 && c.intermediate_size > 0 &&
           c.num_hidden_layers > 0 && c.num_attention_heads > 0 && c.num_key_value_heads > 0 &&
           c.max_position_embeddings > 0 && c.head_dim > 0,
       "every size must be positive");
  need(c.num_attention_heads % c.num_key_value_heads == 0,
       "num_key_value_heads must divide num_attention_heads");
  ordered_json j;
  j["architectures"] = {architecture_of(t)};
  j["model_type"] = t;
  j["vocab_size"] = c.vocab_size;
  if (t == "gpt2") {
    need(c.qkv_bias && c.o_bias && c.mlp_bias, "gpt2 layers all have biases");
    need(c.num_key_value_heads == c.num_attention_heads, "gpt2 has no grouped-query attention");
    need(c.head_dim * c.num_attention_heads == c.hidden_size, "gpt2's head_dim is n_embd / n_head");
    need(c.hidden_act == "gelu_new" || c.hidden_act == "gelu_pytorch_tanh",
         "activation_function must be gelu_new or gelu_pytorch_tanh");
    j["n_embd"] = c.hidden_size;
    j["n_layer"] = c.num_hidden_layers;
    j["n_head"] = c.num_attention_heads;
    j["n_positions"] = c.max_position_embeddings;
    j["n_ctx"] = c.max_position_embeddings;
    j["n_inner"] = c.intermediate_size;
    j["activation_function"] = c.hidden_act;
    j["layer_norm_epsilon"] = c.norm_eps;
    j["scale_attn_weights"] = c.scale_attn_weights;
    j["scale_attn_by_inverse_layer_idx"] = c.scale_attn_by_inverse_layer_idx;
    j["reorder_and_upcast_attn"] = false;
    j["attn_pdrop"] = 0.0;
    j["embd_pdrop"] = 0.0;
    j["resid_pdrop"] = 0.0;
    j["summary_first_dropout"] = 0.0;
  } else {
    need(c.hidden_act == "silu", "hidden_act must be silu");
    j["hidden_size"] = c.hidden_size;
    j["intermediate_size"] = c.intermediate_size;
    j["num_hidden_layers"] = c.num_hidden_layers;
    j["num_attention_heads"] = c.num_attention_heads;
    j["num_key_value_heads"] = c.num_key_value_heads;
    if (t == "qwen2")
      need(c.head_dim * c.num_attention_heads == c.hidden_size,
           "qwen2's head_dim is hidden_size / num_attention_heads");
    else
      j["head_dim"] = c.head_dim;
    j["hidden_act"] = c.hidden_act;
    j["max_position_embeddings"] = c.max_position_embeddings;
    j["rms_norm_eps"] = c.norm_eps;
    j["rope_theta"] = c.rope_theta;
    if (c.rope_scaling_type.empty()) {
      j["rope_scaling"] = nullptr;
    } else {
      ordered_json s;
      s["rope_type"] = c.rope_scaling_type;
      if (c.rope_scaling_factor > 0) s["factor"] = c.rope_scaling_factor;
      if (c.rope_low_freq_factor > 0) s["low_freq_factor"] = c.rope_low_freq_factor;
      if (c.rope_high_freq_factor > 0) s["high_freq_factor"] = c.rope_high_freq_factor;
      if (c.rope_original_max_position_embeddings > 0)
        s["original_max_position_embeddings"] = c.rope_original_max_position_embeddings;
      j["rope_scaling"] = s;
    }
    if (t == "llama") {
      need(c.qkv_bias == c.o_bias, "attention_bias sets the q, k, v and o biases together");
      j["attention_bias"] = c.qkv_bias;
      j["mlp_bias"] = c.mlp_bias;
    } else if (t == "qwen2") {
      need(c.qkv_bias && !c.o_bias && !c.mlp_bias, "qwen2 has q, k and v biases and no other");
      j["use_sliding_window"] = c.sliding_window > 0;
      j["sliding_window"] = c.sliding_window > 0 ? c.sliding_window : 4096;
      j["max_window_layers"] = c.max_window_layers;
    } else {
      need(!c.qkv_bias && !c.o_bias && !c.mlp_bias, "mistral has no biases");
      if (c.sliding_window > 0)
        j["sliding_window"] = c.sliding_window;
      else
        j["sliding_window"] = nullptr;
    }
    j["attention_dropout"] = 0.0;
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["initializer_range"] = 0.02;
  j["use_cache"] = true;
  j["torch_dtype"] = c.torch_dtype.empty() ? "float32" : c.torch_dtype;
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) j["eos_token_id"] = c.eos_token_ids[0];
  if (c.eos_token_ids.size() > 1) j["eos_token_id"] = c.eos_token_ids;
  if (c.pad_token_id >= 0) j["pad_token_id"] = c.pad_token_id;
  return j.dump(2, ' ', false, ordered_json::error_handler_t::replace) + "\n";
}

void write_hf_config(const std::string& path, const HFConfig& c) {
  const std::string text = hf_config_json(c, path);
  write_file_atomic(path, text.data(), text.size());
}

}  // namespace remat
