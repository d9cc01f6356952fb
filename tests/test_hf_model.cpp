// Hugging Face model directories: every family saved and read back gives the same
// configuration and bit-identical parameters; GPT-2 read from a Hugging Face directory trains
// bit for bit like the same weights read from llm.c's file; what `remat train --out` writes
// loads again; and bad directories get an error naming the file and the problem.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "base/error.h"
#include "io/hf_model.h"
#include "io/llmc_model.h"
#include "io/params.h"
#include "io/safetensors.h"
#include "tests/test_util.h"

namespace remat {
namespace {

using test::contains;
using test::run_remat;

ModelConfig small(const std::string& preset, int vocab = 300) {
  ModelConfig c = preset_config(preset, vocab);
  c.num_layers = 2;
  return c;
}

void expect_same_model(const HFModel& a, const ModelConfig& c, const std::vector<float>& p) {
  EXPECT_EQ(a.config.family, c.family);
  EXPECT_EQ(a.config.model_type, c.model_type);
  EXPECT_EQ(a.config.num_layers, c.num_layers);
  EXPECT_EQ(a.config.channels, c.channels);
  EXPECT_EQ(a.config.num_heads, c.num_heads);
  EXPECT_EQ(a.config.kv_heads(), c.kv_heads());
  EXPECT_EQ(a.config.mlp_width(), c.mlp_width());
  EXPECT_EQ(a.config.vocab_size, c.vocab_size);
  EXPECT_EQ(a.config.padded_vocab, c.padded_vocab);
  EXPECT_EQ(a.config.max_seq_len, c.max_seq_len);
  EXPECT_EQ(a.config.norm_eps, c.norm_eps);
  EXPECT_EQ(a.config.rope_theta, c.rope_theta);
  EXPECT_EQ(a.config.qkv_bias, c.qkv_bias);
  EXPECT_EQ(a.config.tied_embeddings, c.tied_embeddings);
  EXPECT_EQ(a.config.rope_scaling, c.rope_scaling);
  EXPECT_EQ(a.config.rope_factor, c.rope_factor);
  EXPECT_EQ(a.config.rope_low_freq_factor, c.rope_low_freq_factor);
  EXPECT_EQ(a.config.rope_high_freq_factor, c.rope_high_freq_factor);
  EXPECT_EQ(a.config.rope_original_max_pos, c.rope_original_max_pos);
  ASSERT_EQ(a.params.size(), p.size());
  EXPECT_EQ(std::memcmp(a.params.data(), p.data(), p.size() * 4), 0);
}

TEST(HFModel, EveryFamilyRoundTripsBitForBit) {
  for (const char* preset : {"tiny", "llama-tiny", "qwen2-tiny", "llama3"}) {
    SCOPED_TRACE(preset);
    ModelConfig c = small(std::string(preset) == "llama3" ? "llama-tiny" : preset);
    if (std::string(preset) == "llama3") {  // with Llama 3's rope scaling
      c.rope_scaling = "llama3";
      c.rope_factor = 32;
      c.rope_low_freq_factor = 1;
      c.rope_high_freq_factor = 4;
      c.rope_original_max_pos = 32;
    }
    const auto p = test::init(c, 5);
    test::TempDir dir;
    save_hf_model(dir.path, c, p.data());
    const HFModel a = load_hf_model(dir.path);
    expect_same_model(a, c, p);
    // Written again and read again: the same bytes.
    test::TempDir dir2;
    save_hf_model(dir2.path, a.config, a.params.data());
    EXPECT_EQ(test::slurp(dir / "model.safetensors"), test::slurp(dir2 / "model.safetensors"));
    EXPECT_EQ(test::slurp(dir / "config.json"), test::slurp(dir2 / "config.json"));
  }
}

TEST(HFModel, LlamaTensorsHaveHuggingFaceNamesAndShapes) {
  ModelConfig c = small("qwen2-tiny");  // biases, untied, GQA
  const auto p = test::init(c, 6);
  test::TempDir dir;
  save_hf_model(dir.path, c, p.data());
  SafetensorsFile f(dir / "model.safetensors");
  const int64_t C = c.channels, HD = c.head_dim(), KV = c.kv_heads() * HD, I = c.mlp_width();
  const int64_t V = c.vocab_size;
  struct Want {
    const char* name;
    std::vector<int64_t> shape;
  };
  for (const Want& w : {Want{"model.embed_tokens.weight", {V, C}},
                        Want{"model.layers.1.self_attn.q_proj.weight", {C, C}},
                        Want{"model.layers.1.self_attn.k_proj.weight", {KV, C}},
                        Want{"model.layers.1.self_attn.v_proj.bias", {KV}},
                        Want{"model.layers.0.self_attn.o_proj.weight", {C, C}},
                        Want{"model.layers.0.mlp.gate_proj.weight", {I, C}},
                        Want{"model.layers.0.mlp.up_proj.weight", {I, C}},
                        Want{"model.layers.0.mlp.down_proj.weight", {C, I}},
                        Want{"model.layers.0.input_layernorm.weight", {C}},
                        Want{"model.layers.0.post_attention_layernorm.weight", {C}},
                        Want{"model.norm.weight", {C}}, Want{"lm_head.weight", {V, C}}}) {
    SCOPED_TRACE(w.name);
    ASSERT_NE(f.find(w.name), nullptr);
    EXPECT_EQ(f.at(w.name).shape, w.shape);
  }
  // k_proj's rows are the middle of remat's packed qkv.
  const ParamTensor* qkv = nullptr;
  const auto table = param_table(c);
  for (const ParamTensor& t : table)
    if (t.name == "layers.1.self_attn.qkv_proj.weight") qkv = &t;
  ASSERT_NE(qkv, nullptr);
  const auto k = f.read_f32("model.layers.1.self_attn.k_proj.weight");
  EXPECT_EQ(std::memcmp(k.data(), p.data() + qkv->offset + C * C, k.size() * 4), 0);
}

TEST(HFModel, GPT2FromHuggingFaceTrainsLikeLlmcFile) {
  test::TempDir dir;
  const ModelConfig c = small("tiny");
  const auto p = test::init(c, 8);
  write_llmc_model(dir / "model.bin", c, p.data(), 3);
  save_hf_model(dir / "hf", c, p.data());
  // Conv1D weights are stored (in, out).
  SafetensorsFile f(dir / "hf/model.safetensors");
  EXPECT_EQ(f.at("transformer.h.0.attn.c_attn.weight").shape,
            (std::vector<int64_t>{c.channels, 3 * c.channels}));
  test::write_random_shard(dir / "train.bin", 3000, c.vocab_size, 4);
  auto run = [&](const std::string& model, const std::string& log) {
    std::vector<std::string> a = test::tiny_train_args(dir / "train.bin", 4);
    a[2] = model;
    for (const char* x : {"--out", "", "--device", "cpu", "--lr", "1e-3", "--log"}) a.push_back(x);
    a.push_back(log);
    const auto r = run_remat(a, dir / ("run_" + std::to_string(log.size())));
    EXPECT_EQ(r.code(), 0) << r.describe();
    return test::slurp(log);
  };
  const std::string from_bin = run(dir / "model.bin", dir / "bin.jsonl");
  const std::string from_hf = run(dir / "hf", dir / "hf.jsonl.log");
  ASSERT_FALSE(from_bin.empty());
  // The logs hold losses, norms and timings; compare the losses (first number after "loss").
  auto losses = [](const std::string& log) {
    std::vector<std::string> v;
    for (size_t at = 0; (at = log.find("\"loss\":", at)) != std::string::npos; at += 7)
      v.push_back(log.substr(at + 7, log.find_first_of(",}", at) - at - 7));
    return v;
  };
  EXPECT_EQ(losses(from_bin), losses(from_hf));
  EXPECT_EQ(losses(from_bin).size(), 4u);
}

TEST(HFModel, TrainOutWritesADirectoryThatLoadsAgain) {
  test::TempDir dir;
  const ModelConfig c = small("llama-tiny");
  const auto p = test::init(c, 9);
  save_hf_model(dir / "in", c, p.data());
  test::write_random_shard(dir / "train.bin", 3000, c.vocab_size, 5);
  std::vector<std::string> a = test::tiny_train_args(dir / "train.bin", 3);
  a[2] = dir / "in";
  for (const char* x : {"--device", "cpu", "--out"}) a.push_back(x);
  a.push_back(dir / "out");
  const auto r = run_remat(a, dir / "run");
  ASSERT_EQ(r.code(), 0) << r.describe() << r.err;
  const HFModel back = load_hf_model(dir / "out");
  EXPECT_EQ(back.config.kv_heads(), c.kv_heads());
  EXPECT_NE(std::memcmp(back.params.data(), p.data(), p.size() * 4), 0)
      << "training changed nothing";
  // And it trains again from there.
  a.back() = dir / "out2";
  a[2] = dir / "out";
  EXPECT_EQ(run_remat(a, dir / "run2").code(), 0);
}

// Rewrites dir's model.safetensors without `drop` and with `change` applied.
void rewrite(const std::string& dir, const std::string& drop,
             const std::function<void(TensorToWrite&, std::vector<float>&)>& change = {}) {
  SafetensorsFile f(dir + "/model.safetensors");
  std::vector<std::vector<float>> data;
  std::vector<TensorToWrite> out;
  data.reserve(f.tensors().size());
  for (const TensorInfo& t : f.tensors()) {
    if (t.name == drop) continue;
    data.push_back(f.read_f32(t.name));
    TensorToWrite w;
    w.name = t.name;
    w.shape = t.shape;
    if (change) change(w, data.back());
    w.data = data.back().data();
    out.push_back(w);
  }
  write_safetensors(dir + "/model.safetensors", out, {{"format", "pt"}});
}

void expect_error(const std::string& dir, const std::vector<std::string>& words) {
  try {
    load_hf_model(dir);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    const std::string m = e.what();
    for (const std::string& w : words) EXPECT_TRUE(contains(m, w)) << m << "\n  lacks: " << w;
    EXPECT_FALSE(contains(m, ".cpp")) << m;
  }
}

TEST(HFModel, BadDirectoriesNameFileAndProblem) {
  const ModelConfig c = small("llama-tiny");
  const auto p = test::init(c, 10);
  {
    test::TempDir d;
    save_hf_model(d.path, c, p.data());
    rewrite(d.path, "model.layers.1.mlp.up_proj.weight");
    expect_error(d.path, {"model.safetensors", "missing tensor model.layers.1.mlp.up_proj.weight"});
  }
  {
    test::TempDir d;
    save_hf_model(d.path, c, p.data());
    rewrite(d.path, "", [](TensorToWrite& w, std::vector<float>& v) {
      if (w.name == "model.layers.0.self_attn.k_proj.weight") {
        w.shape[0] /= 2;  // the config's NKV but half the rows
        v.resize(v.size() / 2);
      }
    });
    expect_error(d.path, {"model.safetensors", "k_proj.weight", "shape", "config.json"});
  }
  {
    test::TempDir d;
    save_hf_model(d.path, c, p.data());
    rewrite(d.path, "", [](TensorToWrite& w, std::vector<float>&) {
      if (w.name == "model.norm.weight") w.name = "model.final_norm.weight";
    });
    expect_error(d.path, {"missing tensor model.norm.weight"});
  }
  {
    test::TempDir d;
    save_hf_model(d.path, c, p.data());
    nlohmann::json js = nlohmann::json::parse(test::slurp(d / "config.json"));
    js["model_type"] = "falcon";
    std::ofstream(d / "config.json") << js.dump();
    expect_error(d.path, {"config.json", "falcon", "llama, qwen2, mistral"});
  }
  {
    // The config says 3 layers, the weights hold 2.
    test::TempDir d;
    save_hf_model(d.path, c, p.data());
    nlohmann::json js = nlohmann::json::parse(test::slurp(d / "config.json"));
    ASSERT_EQ(js["num_hidden_layers"], 2);
    js["num_hidden_layers"] = 3;
    std::ofstream(d / "config.json") << js.dump();
    expect_error(d.path, {"missing tensor model.layers.2."});
  }
  {
    // A tensor stored as integers: the dtype disagrees with a model's weights. The file is
    // written by hand (remat writes only F32 and BF16): every tensor F32 but one I32.
    test::TempDir d;
    save_hf_model(d.path, c, p.data());
    SafetensorsFile f(d / "model.safetensors");
    nlohmann::ordered_json header;
    std::string data;
    for (const TensorInfo& t : f.tensors()) {
      const std::vector<float> v = f.read_f32(t.name);
      const size_t begin = data.size();
      data.append(reinterpret_cast<const char*>(v.data()), v.size() * 4);
      header[t.name] = {{"dtype", t.name == "model.norm.weight" ? "I32" : "F32"},
                        {"shape", t.shape},
                        {"data_offsets", {begin, data.size()}}};
    }
    std::string h = header.dump();
    while (h.size() % 8) h += ' ';
    const uint64_t n = h.size();
    std::ofstream out(d / "model.safetensors", std::ios::binary);
    out.write(reinterpret_cast<const char*>(&n), 8);
    out << h << data;
    out.close();
    expect_error(d.path, {"model.safetensors", "model.norm.weight", "I32"});
  }
  {
    // An extra tensor the config does not describe (o_proj bias): the config is wrong.
    test::TempDir d;
    save_hf_model(d.path, c, p.data());
    SafetensorsFile f(d / "model.safetensors");
    std::vector<std::vector<float>> data;
    std::vector<TensorToWrite> out;
    data.reserve(f.tensors().size() + 1);
    for (const TensorInfo& t : f.tensors()) {
      data.push_back(f.read_f32(t.name));
      out.push_back({t.name, t.shape, data.back().data()});
    }
    data.emplace_back(c.channels, 0.5f);
    out.push_back({"model.layers.0.self_attn.o_proj.bias", {c.channels}, data.back().data()});
    write_safetensors(d / "model.safetensors", out, {{"format", "pt"}});
    expect_error(d.path, {"o_proj.bias", "config.json"});
  }
}

// Models saved by transformers train in remat with the per-step losses transformers and
// torch's AdamW give them (tests/hf/check_transformers.py). Needs torch and transformers
// (REMAT_HF_PYTHON names an interpreter that has them; default python3): skipped without.
TEST(HFModel, TrainsLikeTransformers) {
  const char* py = std::getenv("REMAT_HF_PYTHON");
  const std::string python = py && *py ? py : "python3";
  const auto r = test::run_shell(
      test::shell_quote(python) + " " +
      test::shell_quote(std::string(REMAT_SOURCE_DIR) + "/tests/hf/check_transformers.py") + " " +
      test::shell_quote(REMAT_BINARY));
  if (r.status == 77)
    GTEST_SKIP() << "torch or transformers missing for " << python << ": " << r.output;
  EXPECT_EQ(r.status, 0) << r.output;
  EXPECT_TRUE(contains(r.output, "PASS")) << r.output;
  EXPECT_FALSE(contains(r.output, "FAIL")) << r.output;
}

}  // namespace
}  // namespace remat
