// Writes the seed corpora of the fuzz targets: small valid files made by remat's own writers
// (and a few near misses), so that fuzzing starts from the formats' real structure.
//
// usage: make_seeds DIR   -- creates DIR/{shard,llmc_model,train_state,tokenizer,cli,
//                           safetensors,hf_tokenizer}/
// Each file stays well under the fuzzers' -max_len (64 KiB).
#include <sys/stat.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "io/atomic_file.h"
#include "io/config.h"
#include "io/hf_tokenizer.h"
#include "io/llmc_model.h"
#include "io/params.h"
#include "io/safetensors.h"
#include "io/shards.h"
#include "io/tokenizer.h"
#include "io/train_state.h"
#include "kernels/common.h"

namespace {

std::string g_dir;

void put(const std::string& sub, const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string d = g_dir + "/" + sub;
  ::mkdir(d.c_str(), 0755);
  remat::write_file_atomic(d + "/" + name, bytes.data(), bytes.size());
}

std::vector<uint8_t> bytes_of(const std::string& path) {
  std::vector<uint8_t> b = remat::read_file_bytes(path);
  std::remove(path.c_str());
  return b;
}

// A model small enough for a seed: 1 layer, C = 8, 2 heads, V = 20 (Vp = 32), maxT = 8.
remat::ModelConfig micro_config() {
  remat::ModelConfig c;
  c.max_seq_len = 8;
  c.vocab_size = 20;
  c.padded_vocab = 32;
  c.num_layers = 1;
  c.num_heads = 2;
  c.channels = 8;
  return c;
}

void shards() {
  const std::string tmp = g_dir + "/tmp.bin";
  for (int n : {0, 1, 9, 200}) {
    std::vector<uint16_t> tok(n);
    for (int i = 0; i < n; i++) tok[i] = static_cast<uint16_t>((i * 37 + 11) % 300);
    remat::write_shard(tmp, tok.data(), tok.size());
    const std::vector<uint8_t> file = bytes_of(tmp);
    // Loader settings (see fuzz_shard.cpp): B, T, vocab; plain and shuffled.
    const uint8_t settings[][4] = {{0, 3, 44, 1}, {0x81, 7, 0xff, 0xff}, {1, 0, 10, 0}};
    int k = 0;
    for (const auto& s : settings) {
      std::vector<uint8_t> in(s, s + 4);
      in.insert(in.end(), file.begin(), file.end());
      put("shard", "n" + std::to_string(n) + "_" + std::to_string(k++), in);
    }
  }
}

void models() {
  const remat::ModelConfig c = micro_config();
  std::vector<float> p(remat::num_params(c));
  remat::init_params(p.data(), c, 7);
  const std::string tmp = g_dir + "/tmp.bin";
  for (int version : {3, 5}) {
    remat::write_llmc_model(tmp, c, p.data(), version);
    put("llmc_model", "micro_v" + std::to_string(version), bytes_of(tmp));
  }
  // A GPT-2 124M header with no parameters behind it (a size mismatch).
  remat::ModelConfig g = remat::preset_config("gpt2");
  int32_t h[256] = {remat::kModelMagic, 3,           g.max_seq_len, g.vocab_size,
                    g.num_layers,       g.num_heads, g.channels,    g.padded_vocab};
  std::vector<uint8_t> hb(reinterpret_cast<uint8_t*>(h), reinterpret_cast<uint8_t*>(h) + 1024);
  put("llmc_model", "gpt2_header_only", hb);
}

void states() {
  const remat::ModelConfig c = micro_config();
  remat::TrainState s;
  s.config = c;
  s.step = 3;
  s.params.resize(remat::num_params(c));
  remat::init_params(s.params.data(), c, 9);
  s.loader.epoch = 1;
  s.loader.batch_in_shard = 2;
  s.rng_seed = 1337;
  const std::string tmp = g_dir + "/tmp.bin";
  remat::save_train_state(tmp, s);
  put("train_state", "no_moments", bytes_of(tmp));
  s.m.assign(s.params.size(), 0.001f);
  s.v.assign(s.params.size(), 0.0001f);
  s.extra_json = "{\"lr\":0.0003,\"note\":\"seed\"}";
  remat::save_train_state(tmp, s);
  put("train_state", "with_moments", bytes_of(tmp));
}

void tokenizers() {
  const std::string text =
      "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.\n"
      "A stitch in time saves nine. 1234 5678 90! Numbers, words, and UTF-8: caf\xc3\xa9 "
      "na\xc3\xafve.\tTabs\tand  double  spaces.\n";
  const std::string tmp = g_dir + "/tmp.bin";
  for (int vocab : {257, 300}) {
    remat::Tokenizer::train(text, vocab).save(tmp);
    std::vector<uint8_t> file = bytes_of(tmp);
    put("tokenizer", "trained_" + std::to_string(vocab), file);
    if (vocab != 300) continue;
    // The same vocabulary without the merges section: an llm.c-style, decode-only file.
    size_t at = 1024;
    for (int t = 0; t < vocab; t++) at += 1 + file[at];
    file.resize(at);
    put("tokenizer", "decode_only_300", file);
    // Version 1 (no eot field) of a decode-only file is refused unless vocab > 50256.
    file[4] = 1;
    put("tokenizer", "v1_300", file);
  }
}

// GPT-2's byte-to-unicode map: byte b's character in a byte-level vocab.
std::string byte_char(int b) {
  int next = 256, cp = b;
  for (int x = 0; x <= b; x++) {
    const bool printable = (x >= '!' && x <= '~') || (x >= 0xA1 && x <= 0xAC) || x >= 0xAE;
    cp = printable ? x : next++;
  }
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

// Seeds of fuzz_hf_tokenizer: a tokenizer.json, a NUL, a text. Each file parses (checked).
void hf_tokenizers() {
  using json = nlohmann::json;
  const std::string sp = byte_char(' ');
  json vocab = json::object();
  for (int b = 0; b < 256; b++) vocab[byte_char(b)] = b;
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"h", "e"}, {sp, "t"},       {sp + "t", "he"}, {"i", "n"}, {sp, "a"},   {"e", "r"},
      {"o", "n"}, {sp + "a", "n"}, {"in", "g"},      {"1", "2"}, {"12", "3"}, {sp, sp}};
  json pairs = json::array(), strings = json::array();
  for (const auto& [a, b] : merges) {
    vocab[a + b] = static_cast<int>(vocab.size());
    pairs.push_back({a, b});
    strings.push_back(a + " " + b);
  }
  const int n = static_cast<int>(vocab.size());
  auto added = [](int id, const std::string& content, bool special) {
    return json{{"id", id},          {"content", content}, {"single_word", false},
                {"lstrip", false},   {"rstrip", false},    {"normalized", !special},
                {"special", special}};
  };
  const std::string llama =
      "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
      "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
  const std::string text =
      "The theater in Athens, it's 12345 and 123!\n\tTabs  then<|endoftext|> caf\xc3\xa9 "
      "\xe6\x9d\xb1\xe4\xba\xac \xf0\x9f\x98\x80 WE'LL\r\n";
  std::vector<std::pair<std::string, json>> files;

  json gpt2 = {
      {"version", "1.0"},
      {"added_tokens", {added(n, "<|endoftext|>", true)}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}}},
      {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", pairs}}}};
  files.emplace_back("gpt2", gpt2);

  json l = gpt2;
  l["added_tokens"] = {added(n, "<|begin_of_text|>", true), added(n + 1, "<|end_of_text|>", true)};
  l["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern", {{"Regex", llama}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  l["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"special_tokens",
       {{"<|begin_of_text|>",
         {{"id", "<|begin_of_text|>"}, {"ids", {n}}, {"tokens", {"<|begin_of_text|>"}}}}}}};
  l["model"]["ignore_merges"] = true;
  l["model"]["merges"] = strings;
  files.emplace_back("llama3", l);

  json c = gpt2;
  c["normalizer"] = {{"type", "NFC"}};
  json lstrip = added(n, "[MASK]", true), word = added(n + 1, "<sw>", false);
  lstrip["lstrip"] = lstrip["rstrip"] = true;
  word["single_word"] = true;
  c["added_tokens"] = {lstrip, word, added(n + 2, "<|endoftext|>", true)};
  c["pre_tokenizer"] = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern", {{"String", "\n"}}},
         {"behavior", "MergedWithPrevious"},
         {"invert", false}},
        {{"type", "Split"},
         {"pattern", {{"Regex", "[,;.!]"}}},
         {"behavior", "Contiguous"},
         {"invert", false}},
        {{"type", "Split"},
         {"pattern", {{"Regex", "\\s+"}}},
         {"behavior", "MergedWithNext"},
         {"invert", true}},
        {{"type", "Split"},
         {"pattern", {{"Regex", "x*"}}},
         {"behavior", "Removed"},
         {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}}}}};
  c["model"]["vocab"]["<unk>"] = n + 3;
  c["model"]["vocab"].erase(byte_char('q'));
  c["model"]["unk_token"] = "<unk>";
  c["model"]["fuse_unk"] = true;
  c["added_tokens"].push_back(added(n + 3, "<unk>", true));
  files.emplace_back("crafted", c);

  json bad = gpt2;
  bad["model"]["merges"].push_back({"zz", "y"});
  files.emplace_back("bad_merge", bad);

  for (const auto& [name, j] : files) {
    const std::string s = j.dump();
    if (name != "bad_merge") remat::HfTokenizer::parse(s, name);  // seeds that parse
    std::vector<uint8_t> b(s.begin(), s.end());
    b.push_back(0);
    b.insert(b.end(), text.begin(), text.end());
    put("hf_tokenizer", name, b);
  }
}

void command_lines() {
  const std::vector<std::vector<std::string>> lines = {
      {"--model", "tiny", "--vocab", "300", "--batch", "2", "--seq", "16", "--steps", "3"},
      {"--recompute", "selective,0-3=full", "--lr=1e-3", "--shuffle"},
      {"--recompute", "budget:1.5GiB", "--model", "gpt2-xl", "--total-batch", "65536"},
      {"--recompute", "every:2", "--model", "gpt2-medium", "--verify-recompute"},
      {"--recompute", "ln1+gelu,1=attn+qkv", "--lookahead", "2", "512MB"},
      {"--recompute=attention,0=none,2-5=every:1", "--eps", "1e-8", "--grad-clip=0"},
      {"--out", "4K", "--seed", "-1", "--vocab", "2147483647", "--model", "mini"},
      {"--help"},
  };
  int k = 0;
  for (const auto& line : lines) {
    std::vector<uint8_t> b;
    for (const std::string& a : line) {
      b.insert(b.end(), a.begin(), a.end());
      b.push_back(0);
    }
    put("cli", "line" + std::to_string(k++), b);
  }
}

// Safetensors files from remat's writer (F32, BF16, mixed, metadata, a scalar, empty
// tensors), one by hand with F16, F64 and I32 tensors, Python's spacing and padding, and near
// misses (an overlap, a hole).
void safetensors() {
  const std::string tmp = g_dir + "/tmp.safetensors";
  std::vector<float> v(48);
  for (size_t i = 0; i < v.size(); i++) v[i] = 0.37f * static_cast<float>(i) - 5.0f;
  using T = remat::TensorDType;
  const std::vector<std::vector<remat::TensorToWrite>> files = {
      {{"w", {6, 8}, v.data(), T::kF32}},
      {{"model.embed_tokens.weight", {4, 4}, v.data(), T::kBF16},
       {"model.norm.weight", {4}, v.data() + 16, T::kF32},
       {"lm_head.weight", {2, 4}, v.data() + 20, T::kBF16}},
      {{"scalar", {}, v.data(), T::kF32}, {"empty", {0, 5}, nullptr, T::kBF16}},
  };
  int k = 0;
  for (const auto& ts : files) {
    remat::write_safetensors(tmp, ts,
                             k == 1 ? std::map<std::string, std::string>{{"format", "pt"}}
                                    : std::map<std::string, std::string>{});
    put("safetensors", "written" + std::to_string(k++), bytes_of(tmp));
  }
  auto by_hand = [](const std::string& header, const std::string& data) {
    std::vector<uint8_t> b(8);
    for (int i = 0; i < 8; i++) b[i] = static_cast<uint8_t>(header.size() >> (8 * i));
    b.insert(b.end(), header.begin(), header.end());
    b.insert(b.end(), data.begin(), data.end());
    return b;
  };
  const std::string data16 = std::string("\x00\x3c\x00\xb8\xff\x7b\x01\x00", 8) +
                             std::string("\x55\x55\x55\x55\x55\x55\xd5\x3f", 8) +
                             std::string("\x07\x00\x00\x00", 4);
  put("safetensors", "f16_f64_i32",
      by_hand(R"({"h": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}, )"
              R"("d": {"dtype": "F64", "shape": [], "data_offsets": [8, 16]}, )"
              R"("i": {"dtype": "I32", "shape": [1], "data_offsets": [16, 20]}, )"
              R"("__metadata__": {"who": "python"}}    )",
              data16));
  put("safetensors", "overlap",
      by_hand(R"({"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},)"
              R"("b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]}})",
              "abcd"));
  put("safetensors", "hole",
      by_hand(R"({"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[2,4]}})", "abcd"));
  put("safetensors", "empty", by_hand("{}", ""));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: make_seeds DIR\n");
    return 2;
  }
  g_dir = argv[1];
  ::mkdir(g_dir.c_str(), 0755);
  try {
    shards();
    models();
    states();
    tokenizers();
    hf_tokenizers();
    command_lines();
    safetensors();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_seeds: %s\n", e.what());
    return 1;
  }
  return 0;
}
