// Hugging Face files: safetensors (one file, a sharded checkpoint directory, the writers, every
// malformed header), config.json (llama, qwen2, mistral, gpt2; defaults, errors, write then
// read), and a cross-check with Python (numpy, and the safetensors package when installed).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "base/error.h"
#include "base/rng.h"
#include "io/hf_config.h"
#include "io/llmc_model.h"
#include "io/safetensors.h"
#include "tests/tiny_model.h"

namespace remat {
namespace {

using json = nlohmann::json;
using test::TempDir;

// Runs fn and expects a remat::Error whose message holds every one of `parts` and no source
// location.
void expect_error(const std::function<void()>& fn, const std::vector<std::string>& parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
    EXPECT_EQ(msg.find(".cpp:"), std::string::npos) << "a source location: " << msg;
    EXPECT_EQ(msg.find(".h:"), std::string::npos) << "a source location: " << msg;
    EXPECT_EQ(msg.find(REMAT_SOURCE_DIR), std::string::npos) << "a source path: " << msg;
    return;
  }
  ADD_FAILURE() << "no remat::Error thrown";
}

void write_bytes(const std::string& path, const std::string& b) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(b.data(), static_cast<std::streamsize>(b.size()));
  ASSERT_TRUE(f.good());
}

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

// A safetensors file by hand: the 8-byte length, the header text as given, then `data`.
std::string st_file(const std::string& header, const std::string& data = "") {
  std::string o(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; i++) o[i] = static_cast<char>(n >> (8 * i));
  return o + header + data;
}

uint32_t bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

float from_bits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

void expect_same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); i++)
    ASSERT_EQ(bits(a[i]), bits(b[i])) << "element " << i << ": " << a[i] << " vs " << b[i];
}

std::vector<float> random_values(size_t n, uint64_t seed) {
  Philox r(seed, 0);
  std::vector<float> v(n);
  for (float& x : v) x = r.normal();
  return v;
}

class HFFiles : public ::testing::Test {
 protected:
  std::string path(const std::string& name) const { return dir_ / name; }
  TempDir dir_{"remat_test_hf"};
};

// ---------------------------------------------------------------- safetensors round trips

TEST_F(HFFiles, F32RoundTripIsBitExact) {
  std::vector<float> w = random_values(6 * 5, 1);
  w[0] = from_bits(0x7fc12345u);  // a NaN with a payload
  w[1] = -0.0f;
  w[2] = std::numeric_limits<float>::infinity();
  w[3] = std::numeric_limits<float>::denorm_min();
  w[4] = -std::numeric_limits<float>::max();
  const std::vector<float> b = random_values(5, 2);
  const float scalar = 3.25f;
  const std::vector<TensorToWrite> ts = {
      {"model.layers.0.w", {6, 5}, w.data(), TensorDType::kF32},
      {"a.bias", {5}, b.data(), TensorDType::kF32},
      {"scalar", {}, &scalar, TensorDType::kF32},
      {"empty", {0, 3}, nullptr, TensorDType::kF32},
  };
  const std::string p = path("m.safetensors");
  write_safetensors(p, ts, {{"format", "pt"}, {"note", "q\"uote"}});

  const SafetensorsFile f(p);
  ASSERT_EQ(f.tensors().size(), 4u);
  // Laid out by name (one dtype).
  EXPECT_EQ(f.tensors()[0].name, "a.bias");
  EXPECT_EQ(f.tensors()[1].name, "empty");
  EXPECT_EQ(f.tensors()[2].name, "model.layers.0.w");
  EXPECT_EQ(f.tensors()[3].name, "scalar");
  EXPECT_EQ(f.at("model.layers.0.w").shape, (std::vector<int64_t>{6, 5}));
  EXPECT_EQ(f.at("model.layers.0.w").dtype, TensorDType::kF32);
  EXPECT_EQ(f.at("scalar").shape, std::vector<int64_t>{});
  EXPECT_EQ(f.at("scalar").numel, 1u);
  EXPECT_EQ(f.at("empty").numel, 0u);
  EXPECT_EQ(f.metadata(),
            (std::map<std::string, std::string>{{"format", "pt"}, {"note", "q\"uote"}}));
  expect_same_bits(f.read_f32("model.layers.0.w"), w);
  expect_same_bits(f.read_f32("a.bias"), b);
  expect_same_bits(f.read_f32("scalar"), {scalar});
  EXPECT_TRUE(f.read_f32("empty").empty());
  std::vector<float> into(5);
  f.read_f32("a.bias", into.data(), into.size());
  expect_same_bits(into, b);

  // The Hugging Face layout: header length a multiple of 8, '{' first, space padding, the
  // data right after it and nothing else.
  const std::string bytes = read_bytes(p);
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(n % 8, 0u);
  EXPECT_EQ(bytes[8], '{');
  const std::string header = bytes.substr(8, n);
  EXPECT_EQ(header.find_last_not_of(' '), header.rfind('}'));
  EXPECT_EQ(bytes.size(), 8 + n + 4 * (30 + 5 + 1));
  const json h = json::parse(header);
  EXPECT_EQ(h["model.layers.0.w"]["data_offsets"], json({20, 140}));
  EXPECT_EQ(header.rfind("{\"__metadata__\":", 0), 0u) << header;
}

TEST_F(HFFiles, BF16RoundTripAndMixedDTypes) {
  // Values that are exact in bf16 come back bit for bit; others round to nearest even.
  std::vector<float> exact = random_values(37, 3);
  for (float& x : exact) x = bf16_to_float(float_to_bf16(x));
  exact[5] = from_bits(0xffc10000u);  // a quiet NaN with a payload bf16 holds
  const std::vector<float> inexact = {1.0f + 1.0f / 256 + 1.0f / 512, 1.00390625f, 3e38f};
  const std::vector<float> f32 = random_values(4, 4);
  const std::vector<TensorToWrite> ts = {
      {"b16.exact", {37}, exact.data(), TensorDType::kBF16},
      {"zz.f32", {2, 2}, f32.data(), TensorDType::kF32},
      {"a16.inexact", {3}, inexact.data(), TensorDType::kBF16},
  };
  const std::string p = path("bf.safetensors");
  write_safetensors(p, ts);
  const SafetensorsFile f(p);
  EXPECT_TRUE(f.metadata().empty());
  // F32 first (larger elements), then BF16 by name: every tensor aligned to its element.
  ASSERT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.tensors()[0].name, "zz.f32");
  EXPECT_EQ(f.tensors()[1].name, "a16.inexact");
  EXPECT_EQ(f.tensors()[2].name, "b16.exact");
  EXPECT_EQ(f.at("b16.exact").dtype, TensorDType::kBF16);
  EXPECT_EQ(f.at("b16.exact").end - f.at("b16.exact").begin, 37u * 2);
  expect_same_bits(f.read_f32("b16.exact"), exact);
  expect_same_bits(f.read_f32("zz.f32"), f32);
  std::vector<float> rounded;
  for (float x : inexact) rounded.push_back(bf16_to_float(float_to_bf16(x)));
  expect_same_bits(f.read_f32("a16.inexact"), rounded);
  const std::vector<uint8_t> raw = f.read_bytes("a16.inexact");
  ASSERT_EQ(raw.size(), 6u);
  uint16_t first;
  std::memcpy(&first, raw.data(), 2);
  EXPECT_EQ(first, float_to_bf16(inexact[0]));
  // Writing what was read gives the same file.
  const std::vector<float> e2 = f.read_f32("b16.exact"), a2 = f.read_f32("a16.inexact"),
                           z2 = f.read_f32("zz.f32");
  write_safetensors(path("again.safetensors"),
                    {{"b16.exact", {37}, e2.data(), TensorDType::kBF16},
                     {"zz.f32", {2, 2}, z2.data(), TensorDType::kF32},
                     {"a16.inexact", {3}, a2.data(), TensorDType::kBF16}});
  EXPECT_EQ(read_bytes(path("again.safetensors")), read_bytes(p));
}

TEST_F(HFFiles, F16AndF64ReadAsFloat) {
  // Half: 1, -0.5, 65504 (max), 2^-24 (smallest subnormal), 2^-14 (smallest normal), -0,
  // inf, a NaN; double: 1/3 (rounded), -2.
  const uint16_t h[] = {0x3c00, 0xb800, 0x7bff, 0x0001, 0x0400, 0x8000, 0x7c00, 0x7e01};
  const double d[] = {1.0 / 3, -2.0};
  std::string data(reinterpret_cast<const char*>(h), sizeof h);
  data += std::string(reinterpret_cast<const char*>(d), sizeof d);
  data += std::string("\x01\x00\x00\x00", 4);
  const std::string header = R"({"h":{"dtype":"F16","shape":[2,4],"data_offsets":[0,16]},)"
                             R"("d":{"dtype":"F64","shape":[2],"data_offsets":[16,32]},)"
                             R"("i":{"dtype":"I32","shape":[1],"data_offsets":[32,36]}})";
  write_bytes(path("h.safetensors"), st_file(header, data));
  const SafetensorsFile f(path("h.safetensors"));
  const std::vector<float> v = f.read_f32("h");
  ASSERT_EQ(v.size(), 8u);
  EXPECT_EQ(bits(v[0]), bits(1.0f));
  EXPECT_EQ(bits(v[1]), bits(-0.5f));
  EXPECT_EQ(bits(v[2]), bits(65504.0f));
  EXPECT_EQ(bits(v[3]), bits(std::ldexp(1.0f, -24)));
  EXPECT_EQ(bits(v[4]), bits(std::ldexp(1.0f, -14)));
  EXPECT_EQ(bits(v[5]), bits(-0.0f));
  EXPECT_EQ(bits(v[6]), bits(std::numeric_limits<float>::infinity()));
  EXPECT_EQ(bits(v[7]), 0x7fc02000u);  // payload kept
  const std::vector<float> dv = f.read_f32("d");
  EXPECT_EQ(bits(dv[0]), bits(static_cast<float>(1.0 / 3)));
  EXPECT_EQ(dv[1], -2.0f);
  EXPECT_EQ(f.at("i").dtype, TensorDType::kI32);
  EXPECT_STREQ(dtype_name(TensorDType::kF8E4M3), "F8_E4M3");
  expect_error([&] { f.read_f32("i"); }, {path("h.safetensors"), "'i'", "I32", "fp32"});
  std::vector<float> small(3);
  expect_error([&] { f.read_f32("h", small.data(), small.size()); },
               {path("h.safetensors"), "'h'", "8 elements", "[2, 4]", "3"});
  expect_error([&] { f.at("model.embed_tokens.weight"); },
               {path("h.safetensors"), "no tensor 'model.embed_tokens.weight'", "3 tensors", "'d'",
                "'h'", "'i'"});
}

// ---------------------------------------------------------------- checkpoint directories

TEST_F(HFFiles, ShardedCheckpointFindsEveryTensor) {
  std::vector<std::vector<float>> vals;
  std::vector<TensorToWrite> ts;
  const char* names[] = {"model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                         "model.layers.0.mlp.up_proj.weight", "model.norm.weight",
                         "lm_head.weight"};
  for (int i = 0; i < 5; i++) vals.push_back(random_values(16 * (i + 1), 10 + i));
  for (int i = 0; i < 5; i++)
    ts.push_back(
        {names[i], {i + 1, 16}, vals[i].data(), i == 4 ? TensorDType::kBF16 : TensorDType::kF32});
  // Bytes 64 + 128 + 192 (f32) fill the first shard of at most 450; 256 (f32) + 160 (bf16)
  // the second.
  const std::vector<std::string> written = write_safetensors_checkpoint(dir_.path, ts, 450);
  ASSERT_EQ(written.size(), 3u);
  EXPECT_EQ(written[0], path("model-00001-of-00002.safetensors"));
  EXPECT_EQ(written[1], path("model-00002-of-00002.safetensors"));
  EXPECT_EQ(written[2], path("model.safetensors.index.json"));
  const json idx = json::parse(read_bytes(written[2]));
  EXPECT_EQ(idx["metadata"]["total_size"], 64 + 128 + 192 + 256 + 160);
  EXPECT_EQ(idx["weight_map"].size(), 5u);
  EXPECT_EQ(idx["weight_map"]["model.norm.weight"], "model-00002-of-00002.safetensors");
  EXPECT_EQ(idx["weight_map"]["lm_head.weight"], "model-00002-of-00002.safetensors");
  EXPECT_EQ(idx["weight_map"]["model.layers.0.mlp.up_proj.weight"],
            "model-00001-of-00002.safetensors");
  EXPECT_EQ(SafetensorsFile(written[0]).tensors().size(), 3u);

  for (const std::string& open : {dir_.path, written[2]}) {
    const SafetensorsCheckpoint ck(open);
    EXPECT_EQ(ck.path(), written[2]);
    EXPECT_EQ(ck.num_files(), 2u);
    ASSERT_EQ(ck.names().size(), 5u);
    for (int i = 0; i < 5; i++) {
      std::vector<float> want = vals[i];
      if (i == 4)
        for (float& x : want) x = bf16_to_float(float_to_bf16(x));
      expect_same_bits(ck.read_f32(names[i]), want);
      EXPECT_EQ(ck.at(names[i]).shape, (std::vector<int64_t>{i + 1, 16}));
    }
    EXPECT_EQ(ck.file_of("model.norm.weight").path(), path("model-00002-of-00002.safetensors"));
    EXPECT_EQ(ck.file_of("lm_head.weight").metadata().at("format"), "pt");
    expect_error([&] { ck.at("model.layers.0.self_attn.k_proj.weight"); },
                 {written[2], "no tensor 'model.layers.0.self_attn.k_proj.weight'", "5 tensors",
                  "'model.layers.0.self_attn.q_proj.weight'"});
  }

  // Everything in one shard: DIR/model.safetensors, no index; preferred over an index.
  TempDir one("remat_test_hf_one");
  const std::vector<std::string> single = write_safetensors_checkpoint(one.path, ts);
  ASSERT_EQ(single.size(), 1u);
  EXPECT_EQ(single[0], one / "model.safetensors");
  write_bytes(one / "model.safetensors.index.json", "not json");
  const SafetensorsCheckpoint ck(one.path);
  EXPECT_EQ(ck.path(), one / "model.safetensors");
  EXPECT_EQ(ck.num_files(), 1u);
  expect_same_bits(ck.read_f32(names[2]), vals[2]);
  const SafetensorsCheckpoint direct(one / "model.safetensors");
  EXPECT_EQ(direct.names(), ck.names());
}

TEST_F(HFFiles, BadIndexesAreRefusedNamingTheProblem) {
  const std::vector<float> v = {1, 2};
  write_safetensors(path("s1.safetensors"), {{"a", {2}, v.data()}, {"b", {2}, v.data()}});
  const std::string idx = path("model.safetensors.index.json");
  auto with_index = [&](const std::string& text) {
    write_bytes(idx, text);
    const std::string d = dir_.path;
    return [d] { SafetensorsCheckpoint ck(d); };
  };
  expect_error(with_index(R"({"weight_map":{"a":"s1.safetensors","c":"s1.safetensors"}})"),
               {idx, "tensor 'c'", "s1.safetensors", "does not hold it", "'a'", "'b'"});
  expect_error(with_index(R"({"weight_map":{"a":"s2.safetensors"}})"),
               {path("s2.safetensors"), "cannot open"});
  expect_error(with_index(R"({"weight_map":{"a":"../s1.safetensors"}})"),
               {idx, "'../s1.safetensors'", "not a file name"});
  expect_error(with_index(R"({"weight_map":{"a":7}})"), {idx, "tensor 'a'", "not a file name"});
  expect_error(with_index(R"({"metadata":{}})"), {idx, "no \"weight_map\""});
  expect_error(with_index(R"({"weight_map":[]})"), {idx, "\"weight_map\"", "not an object"});
  expect_error(with_index(R"({"weight_map":)"), {idx, "not valid JSON"});
  expect_error(with_index(R"([1])"), {idx, "not an object"});
  // A working index for comparison.
  write_bytes(idx, R"({"metadata":{"total_size":8},"weight_map":{"a":"s1.safetensors"}})");
  const SafetensorsCheckpoint ok(dir_.path);
  EXPECT_EQ(ok.names(), std::vector<std::string>{"a"});
  EXPECT_FALSE(ok.contains("b"));  // in the shard, not in the index

  TempDir empty("remat_test_hf_empty");
  expect_error([&] { SafetensorsCheckpoint ck(empty.path); },
               {empty.path, "model.safetensors", "model.safetensors.index.json", "neither"});
}

// ---------------------------------------------------------------- malformed files

TEST_F(HFFiles, EveryBadHeaderIsAnErrorNamingFileAndProblem) {
  int k = 0;
  // Writes the bytes to a fresh file and expects opening it to fail with `parts`.
  auto bad = [&](const std::string& bytes, std::vector<std::string> parts) {
    const std::string p = path("bad" + std::to_string(k++) + ".safetensors");
    write_bytes(p, bytes);
    parts.insert(parts.begin(), p);
    SCOPED_TRACE(parts[1]);
    expect_error([&] { SafetensorsFile f(p); }, parts);
  };
  const std::string f8(8, '\0');  // 8 data bytes
  auto entry = [](const std::string& name, const std::string& body) {
    return "\"" + name + "\":" + body;
  };
  const std::string a01 = entry("a", R"({"dtype":"F32","shape":[2],"data_offsets":[0,8]})");

  bad("", {"0 bytes", "shorter than the 8-byte header length"});
  bad(std::string("\x05\0\0", 3), {"3 bytes", "shorter than the 8-byte"});
  bad(st_file("{}").substr(0, 8) + std::string(1, '{'), {"header length 2", "longer than the 1"});
  bad(std::string("\xff\xff\xff\xff\xff\xff\xff\xff", 8) + "{}",
      {"header length 18446744073709551615", "longer"});
  bad(st_file("{\"a\":", ""), {"not valid JSON"});
  bad(st_file("{} {}", ""), {"not valid JSON"});
  bad(st_file("[1, 2]", ""), {"does not begin with '{'"});
  bad(st_file(" {}", ""), {"does not begin with '{'"});
  bad(st_file("{\"a\":\"\xff\"}", ""), {"not valid JSON"});  // not UTF-8
  bad(st_file("{" + a01 + "," + a01 + "}", f8), {"key 'a' twice"});
  bad(st_file("{\"a\":[1]}", f8), {"tensor 'a'", "not an object"});
  bad(st_file("{" + entry("a", R"({"shape":[2],"data_offsets":[0,8]})") + "}", f8),
      {"tensor 'a'", "no \"dtype\""});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","data_offsets":[0,8]})") + "}", f8),
      {"tensor 'a'", "no \"shape\""});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":[2]})") + "}", f8),
      {"tensor 'a'", "no \"data_offsets\""});
  bad(st_file("{" + entry("a", R"({"dtype":32,"shape":[2],"data_offsets":[0,8]})") + "}", f8),
      {"tensor 'a'", "\"dtype\"", "not a string"});
  bad(st_file("{" + entry("a", R"({"dtype":"F12","shape":[2],"data_offsets":[0,8]})") + "}", f8),
      {"tensor 'a'", "unknown dtype 'F12'", "BF16"});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":[-2],"data_offsets":[0,8]})") + "}", f8),
      {"tensor 'a'", "\"shape\" holds -2", "non-negative integer"});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":[2.0],"data_offsets":[0,8]})") + "}", f8),
      {"tensor 'a'", "holds 2.0", "non-negative integer"});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":[[[2]]],"data_offsets":[0,8]})") + "}",
              f8),
      {"tensor 'a'", "holds (a JSON array of 1)", "non-negative integer"});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":2,"data_offsets":[0,8]})") + "}", f8),
      {"tensor 'a'", "\"shape\"", "not an array"});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":[2],"data_offsets":[0]})") + "}", f8),
      {"tensor 'a'", "[0]", "not [begin, end]"});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":[2],"data_offsets":[8,0]})") + "}", f8),
      {"tensor 'a'", "[8,0]", "end before they begin"});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":[3],"data_offsets":[0,8]})") + "}", f8),
      {"tensor 'a'", "hold 8 bytes", "shape [3] of F32 needs 12"});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":[2],"data_offsets":[0,16]})") + "}", f8),
      {"tensor 'a'", "past the data, which holds 8 bytes"});
  bad(st_file("{" +
                  entry("a", R"({"dtype":"F32","shape":[4294967296,4294967296],)"
                             R"("data_offsets":[0,8]})") +
                  "}",
              f8),
      {"tensor 'a'", "overflows"});
  bad(st_file(
          "{" + a01 + "," + entry("b", R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})") + "}",
          f8),
      {"tensor 'b'", "overlaps tensor 'a'"});
  bad(st_file("{" + entry("a", R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})") + "}", f8),
      {"4 bytes before tensor 'a'", "belong to no tensor"});
  bad(st_file("{" + a01 + "}", f8 + "xyz"), {"3 bytes after the last tensor", "no tensor"});
  bad(st_file("{\"__metadata__\":{\"format\":1}," + a01 + "}", f8),
      {"__metadata__", "'format'", "not a string"});
  bad(st_file("{\"__metadata__\":[]," + a01 + "}", f8), {"__metadata__", "not an object"});
  expect_error([&] { SafetensorsFile f(path("missing.safetensors")); },
               {path("missing.safetensors"), "cannot open"});

  // What the format allows: padding spaces, metadata null, zero-size tensors anywhere, no
  // tensors at all.
  const std::string fine =
      "{" + a01 + "," + entry("z", R"({"dtype":"BF16","shape":[0],"data_offsets":[8,8]})") + "," +
      entry("e", R"({"dtype":"U8","shape":[3,0],"data_offsets":[0,0]})") +
      ",\"__metadata__\":null}    ";
  write_bytes(path("fine.safetensors"), st_file(fine, f8));
  const SafetensorsFile f(path("fine.safetensors"));
  EXPECT_EQ(f.tensors().size(), 3u);
  EXPECT_EQ(f.read_f32("a"), (std::vector<float>{0, 0}));
  write_bytes(path("none.safetensors"), st_file("{}"));
  EXPECT_TRUE(SafetensorsFile(path("none.safetensors")).tensors().empty());
}

TEST_F(HFFiles, WriterChecksItsArguments) {
  const float x = 1;
  EXPECT_THROW(write_safetensors(path("w.safetensors"), {{"a", {1}, &x}, {"a", {1}, &x}}), Error);
  EXPECT_THROW(write_safetensors(path("w.safetensors"), {{"__metadata__", {1}, &x}}), Error);
  EXPECT_THROW(write_safetensors(path("w.safetensors"), {{"a", {1}, &x, TensorDType::kF16}}),
               Error);
  EXPECT_THROW(write_safetensors(path("w.safetensors"), {{"a", {-1}, &x}}), Error);
  EXPECT_THROW(write_safetensors(path("w.safetensors"), {{"a", {1}, nullptr}}), Error);
  expect_error(
      [&] {
        write_safetensors(path("no/such/dir/w.safetensors"), {{"a", {1}, &x}});
      },
      {path("no/such/dir/w.safetensors")});
  expect_error(
      [&] {
        write_safetensors_checkpoint(path("nodir"), {{"a", {1}, &x}});
      },
      {path("nodir"), "not a directory"});
}

// ---------------------------------------------------------------- config.json

const char* kLlama = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
  "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
  "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
  "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
  "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"},
  "hidden_act": "silu", "attention_bias": false, "mlp_bias": false,
  "tie_word_embeddings": true, "torch_dtype": "bfloat16", "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009], "pretraining_tp": 1, "use_cache": true})";

const char* kQwen2 = R"({
  "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
  "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
  "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
  "max_window_layers": 21, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
  "rope_scaling": null, "sliding_window": 32768, "use_sliding_window": false,
  "hidden_act": "silu", "tie_word_embeddings": true, "torch_dtype": "bfloat16",
  "bos_token_id": 151643, "eos_token_id": 151645})";

const char* kMistral = R"({
  "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
  "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
  "num_key_value_heads": 8, "max_position_embeddings": 32768, "rms_norm_eps": 1e-05,
  "rope_theta": 1000000.0, "sliding_window": null, "hidden_act": "silu",
  "tie_word_embeddings": false, "bos_token_id": 1, "eos_token_id": 2})";

const char* kGPT2 = R"({
  "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "attn_pdrop": 0.1,
  "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256, "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
  "n_head": 12, "n_layer": 12, "n_positions": 1024, "resid_pdrop": 0.1,
  "summary_activation": null, "task_specific_params": {"text-generation": {"do_sample": true}},
  "vocab_size": 50257})";

TEST_F(HFFiles, ConfigsOfEachFamilyRead) {
  const HFConfig l = parse_hf_config(kLlama, "llama/config.json");
  EXPECT_EQ(l.model_type, "llama");
  EXPECT_TRUE(l.is_llama_family());
  EXPECT_EQ(l.architectures, std::vector<std::string>{"LlamaForCausalLM"});
  EXPECT_EQ(l.vocab_size, 128256);
  EXPECT_EQ(l.hidden_size, 2048);
  EXPECT_EQ(l.intermediate_size, 8192);
  EXPECT_EQ(l.num_hidden_layers, 16);
  EXPECT_EQ(l.num_attention_heads, 32);
  EXPECT_EQ(l.num_key_value_heads, 8);
  EXPECT_EQ(l.head_dim, 64);
  EXPECT_EQ(l.max_position_embeddings, 131072);
  EXPECT_EQ(l.norm_eps, 1e-5);
  EXPECT_EQ(l.rope_theta, 500000.0);
  EXPECT_EQ(l.rope_scaling_type, "llama3");
  EXPECT_EQ(l.rope_scaling_factor, 32.0);
  EXPECT_EQ(l.rope_low_freq_factor, 1.0);
  EXPECT_EQ(l.rope_high_freq_factor, 4.0);
  EXPECT_EQ(l.rope_original_max_position_embeddings, 8192);
  EXPECT_TRUE(l.tie_word_embeddings);
  EXPECT_FALSE(l.qkv_bias || l.o_bias || l.mlp_bias);
  EXPECT_EQ(l.hidden_act, "silu");
  EXPECT_EQ(l.sliding_window, 0);
  EXPECT_EQ(l.torch_dtype, "bfloat16");
  EXPECT_EQ(l.bos_token_id, 128000);
  EXPECT_EQ(l.eos_token_ids, (std::vector<int>{128001, 128008, 128009}));
  EXPECT_EQ(l.pad_token_id, -1);

  const HFConfig q = parse_hf_config(kQwen2, "qwen/config.json");
  EXPECT_EQ(q.head_dim, 64);
  EXPECT_TRUE(q.qkv_bias);
  EXPECT_FALSE(q.o_bias || q.mlp_bias);
  EXPECT_EQ(q.sliding_window, 0);  // use_sliding_window false
  EXPECT_EQ(q.max_window_layers, 21);
  EXPECT_EQ(q.rope_scaling_type, "");
  EXPECT_EQ(q.eos_token_ids, std::vector<int>{151645});
  std::string qs = kQwen2;
  qs.replace(qs.find("\"use_sliding_window\": false"), 27, "\"use_sliding_window\": true");
  EXPECT_EQ(parse_hf_config(qs, "q").sliding_window, 32768);

  const HFConfig m = parse_hf_config(kMistral, "mistral/config.json");
  EXPECT_EQ(m.sliding_window, 0);  // null
  EXPECT_EQ(m.head_dim, 128);
  EXPECT_FALSE(m.qkv_bias || m.o_bias || m.mlp_bias);
  EXPECT_FALSE(m.tie_word_embeddings);
  EXPECT_EQ(m.torch_dtype, "");

  const HFConfig g = parse_hf_config(kGPT2, "gpt2/config.json");
  EXPECT_EQ(g.hidden_size, 768);
  EXPECT_EQ(g.num_hidden_layers, 12);
  EXPECT_EQ(g.num_attention_heads, 12);
  EXPECT_EQ(g.num_key_value_heads, 12);
  EXPECT_EQ(g.head_dim, 64);
  EXPECT_EQ(g.max_position_embeddings, 1024);
  EXPECT_EQ(g.intermediate_size, 3072);  // n_inner absent: 4 * n_embd
  EXPECT_EQ(g.norm_eps, 1e-5);
  EXPECT_EQ(g.hidden_act, "gelu_new");
  EXPECT_TRUE(g.tie_word_embeddings);  // PretrainedConfig's default
  EXPECT_TRUE(g.qkv_bias && g.o_bias && g.mlp_bias);
  EXPECT_TRUE(g.scale_attn_weights);
  EXPECT_FALSE(g.is_llama_family());
}

TEST_F(HFFiles, ConfigDefaultsFollowTransformers) {
  const std::string sizes = R"("vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
      "num_hidden_layers": 2, "num_attention_heads": 16, "max_position_embeddings": 256)";
  const HFConfig l = parse_hf_config("{\"model_type\": \"llama\", " + sizes + "}", "c");
  EXPECT_EQ(l.num_key_value_heads, 16);
  EXPECT_EQ(l.head_dim, 4);
  EXPECT_EQ(l.norm_eps, 1e-6);
  EXPECT_EQ(l.rope_theta, 10000.0);
  EXPECT_EQ(l.hidden_act, "silu");
  EXPECT_FALSE(l.tie_word_embeddings);
  EXPECT_EQ(l.sliding_window, 0);
  const HFConfig m = parse_hf_config("{\"model_type\": \"mistral\", " + sizes + "}", "c");
  EXPECT_EQ(m.sliding_window, 4096);  // MistralConfig's defaults when the keys are absent
  EXPECT_EQ(m.num_key_value_heads, 8);
  const HFConfig q = parse_hf_config("{\"model_type\": \"qwen2\", " + sizes + "}", "c");
  EXPECT_EQ(q.max_window_layers, 28);
  EXPECT_EQ(q.sliding_window, 0);
  // transformers 5 keeps rope_theta in rope_parameters.
  const HFConfig r = parse_hf_config(
      "{\"model_type\": \"llama\", " + sizes +
          R"(, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})",
      "c");
  EXPECT_EQ(r.rope_theta, 500000.0);
  EXPECT_EQ(r.rope_scaling_type, "");
  const HFConfig g = parse_hf_config(
      R"({"model_type": "gpt2", "vocab_size": 10, "n_embd": 8, "n_layer": 1, "n_head": 2,
          "n_positions": 16, "n_inner": null, "dtype": "float32"})",
      "c");
  EXPECT_EQ(g.intermediate_size, 32);
  EXPECT_EQ(g.norm_eps, 1e-5);
  EXPECT_EQ(g.torch_dtype, "float32");
}

TEST_F(HFFiles, BadConfigsNameThePathAndTheKey) {
  const std::string p = path("config.json");
  auto bad = [&](const std::string& text, const std::vector<std::string>& parts) {
    write_bytes(p, text);
    std::vector<std::string> all = parts;
    all.insert(all.begin(), p);
    SCOPED_TRACE(parts[0]);
    expect_error([&] { read_hf_config(p); }, all);
  };
  json base = json::parse(kLlama);
  auto with = [&](const char* key, const json& v) {
    json j = base;
    j[key] = v;
    return j.dump();
  };
  auto without = [&](const char* key) {
    json j = base;
    j.erase(key);
    return j.dump();
  };
  bad("{", {"not valid JSON"});
  bad("[]", {"not a JSON object"});
  bad(without("model_type"), {"\"model_type\"", "missing"});
  bad(with("model_type", "bert"),
      {"\"model_type\"", "'bert'", "supported: llama, qwen2, mistral, gpt2"});
  bad(with("model_type", 3), {"\"model_type\"", "must be a string"});
  bad(without("hidden_size"), {"\"hidden_size\"", "missing"});
  bad(without("vocab_size"), {"\"vocab_size\"", "missing"});
  bad(without("max_position_embeddings"), {"\"max_position_embeddings\"", "missing"});
  bad(with("hidden_size", 0), {"\"hidden_size\"", "positive integer", "0"});
  bad(with("num_hidden_layers", -2), {"\"num_hidden_layers\"", "positive integer", "-2"});
  bad(with("intermediate_size", 8192.0), {"\"intermediate_size\"", "positive integer"});
  bad(with("vocab_size", "128256"), {"\"vocab_size\"", "positive integer"});
  bad(with("num_attention_heads", 4294967296ull), {"\"num_attention_heads\"", "at most"});
  bad(with("num_key_value_heads", 5), {"\"num_key_value_heads\"", "(5)", "does not divide"});
  bad(with("rms_norm_eps", -1), {"\"rms_norm_eps\"", "positive number"});
  bad(with("rope_theta", "big"), {"\"rope_theta\"", "positive number"});
  bad(with("tie_word_embeddings", 1), {"\"tie_word_embeddings\"", "true or false"});
  bad(with("hidden_act", "gelu"), {"\"hidden_act\"", "'gelu'", "silu"});
  bad(with("bos_token_id", -5), {"\"bos_token_id\"", "token id"});
  bad(with("eos_token_id", json::array({1, "x"})), {"\"eos_token_id\"", "token id"});
  bad(with("rope_scaling", 3), {"\"rope_scaling\"", "object or null"});
  bad(with("rope_scaling", json{{"rope_type", "linear"}, {"factor", "x"}}),
      {"\"rope_scaling.factor\"", "positive number"});
  bad(with("architectures", "Llama"), {"\"architectures\"", "list of strings"});
  json nohead = base;
  nohead.erase("head_dim");
  nohead["num_attention_heads"] = 24;
  nohead["num_key_value_heads"] = 8;
  bad(nohead.dump(), {"\"num_attention_heads\"", "(24)", "does not divide hidden_size (2048)"});
  base = json::parse(kGPT2);
  bad(without("n_embd"), {"\"n_embd\"", "missing"});
  bad(with("activation_function", "relu"), {"\"activation_function\"", "'relu'"});
  bad(with("n_head", 5), {"\"n_head\"", "(5)", "n_embd (768)"});
  bad(with("head_dim", 32), {"\"head_dim\"", "hidden_size / num_attention_heads"});
  expect_error([&] { read_hf_config(path("none.json")); }, {path("none.json")});
}

TEST_F(HFFiles, WrittenConfigsReadBackAndLookLikeTransformers) {
  for (const char* text : {kLlama, kQwen2, kMistral, kGPT2}) {
    HFConfig c = parse_hf_config(text, "in");
    c.torch_dtype = "float32";
    const std::string p = path(c.model_type + ".json");
    write_hf_config(p, c);
    const HFConfig back = read_hf_config(p);
    SCOPED_TRACE(c.model_type);
    const json j = json::parse(read_bytes(p));
    EXPECT_EQ(back.model_type, c.model_type);
    EXPECT_EQ(j["architectures"].size(), 1u);
    EXPECT_EQ(back.architectures, j["architectures"].get<std::vector<std::string>>());
    EXPECT_EQ(back.vocab_size, c.vocab_size);
    EXPECT_EQ(back.hidden_size, c.hidden_size);
    EXPECT_EQ(back.intermediate_size, c.intermediate_size);
    EXPECT_EQ(back.num_hidden_layers, c.num_hidden_layers);
    EXPECT_EQ(back.num_attention_heads, c.num_attention_heads);
    EXPECT_EQ(back.num_key_value_heads, c.num_key_value_heads);
    EXPECT_EQ(back.head_dim, c.head_dim);
    EXPECT_EQ(back.max_position_embeddings, c.max_position_embeddings);
    EXPECT_EQ(back.norm_eps, c.norm_eps);
    EXPECT_EQ(back.hidden_act, c.hidden_act);
    EXPECT_EQ(back.rope_theta, c.rope_theta);
    EXPECT_EQ(back.rope_scaling_type, c.rope_scaling_type);
    EXPECT_EQ(back.rope_scaling_factor, c.rope_scaling_factor);
    EXPECT_EQ(back.rope_low_freq_factor, c.rope_low_freq_factor);
    EXPECT_EQ(back.rope_high_freq_factor, c.rope_high_freq_factor);
    EXPECT_EQ(back.rope_original_max_position_embeddings, c.rope_original_max_position_embeddings);
    EXPECT_EQ(back.tie_word_embeddings, c.tie_word_embeddings);
    EXPECT_EQ(back.qkv_bias, c.qkv_bias);
    EXPECT_EQ(back.o_bias, c.o_bias);
    EXPECT_EQ(back.mlp_bias, c.mlp_bias);
    EXPECT_EQ(back.sliding_window, c.sliding_window);
    EXPECT_EQ(back.max_window_layers, c.max_window_layers);
    EXPECT_EQ(back.torch_dtype, "float32");
    EXPECT_EQ(back.bos_token_id, c.bos_token_id);
    EXPECT_EQ(back.eos_token_ids, c.eos_token_ids);
    EXPECT_EQ(back.pad_token_id, c.pad_token_id);
    if (c.model_type == "gpt2") {
      EXPECT_EQ(j["n_embd"], 768);
      EXPECT_EQ(j["n_positions"], 1024);
      EXPECT_EQ(j["activation_function"], "gelu_new");
      EXPECT_EQ(j["attn_pdrop"], 0.0);
      EXPECT_FALSE(j.contains("hidden_size"));
    } else {
      EXPECT_EQ(j["hidden_size"], c.hidden_size);
      EXPECT_EQ(j["rms_norm_eps"], c.norm_eps);
      EXPECT_EQ(j["hidden_act"], "silu");
    }
  }
  HFConfig q = parse_hf_config(kQwen2, "in");
  q.o_bias = true;
  expect_error([&] { write_hf_config(path("q.json"), q); },
               {path("q.json"), "qwen2", "q, k and v biases"});
  HFConfig g = parse_hf_config(kGPT2, "in");
  g.qkv_bias = false;
  expect_error([&] { write_hf_config(path("g.json"), g); }, {path("g.json"), "gpt2", "biases"});
  HFConfig u = g;
  u.model_type = "bert";
  expect_error([&] { write_hf_config(path("u.json"), u); }, {path("u.json"), "'bert'"});
}

// ---------------------------------------------------------------- Python cross-check

// A file written by hand in Python (json.dumps' spacing, insertion order, __metadata__ last,
// no padding) reads here, and remat's file reads there (numpy, and the safetensors package
// itself when it is installed).
const char* kPython = R"PY(
import json, struct, sys
import numpy as np
mode, path = sys.argv[1], sys.argv[2]
if mode == "write":
    z = (np.arange(6, dtype=np.float32) * 0.25 - 0.5).reshape(3, 2)
    h = np.array([1, -0.5, 65504, 2.0 ** -24], dtype=np.float16)
    m = np.array(1 / 3, dtype=np.float64)
    data = z.tobytes() + h.tobytes() + m.tobytes()
    hdr = {"z.f32": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]},
           "a.f16": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
           "m.f64": {"dtype": "F64", "shape": [], "data_offsets": [32, 40]},
           "__metadata__": {"who": "python"}}
    text = json.dumps(hdr).encode()
    open(path, "wb").write(struct.pack("<Q", len(text)) + text + data)
    try:
        from safetensors.numpy import save_file
    except ImportError:
        sys.exit(0)
    save_file({"z.f32": z, "a.f16": h}, path + ".hf", metadata={"format": "np"})
else:
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    assert n % 8 == 0 and b[8:9] == b"{", "header"
    hdr = json.loads(b[8:8 + n])
    assert hdr["__metadata__"] == {"format": "pt"}, hdr
    data = b[8 + n:]
    def get(name):
        e = hdr[name]
        s, t = e["data_offsets"]
        raw = data[s:t]
        if e["dtype"] == "F32":
            return np.frombuffer(raw, "<f4").reshape(e["shape"])
        assert e["dtype"] == "BF16", e
        u = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
        return u.view(np.float32).reshape(e["shape"])
    x = get("x")
    assert x.shape == (2, 3) and (x == np.arange(6).reshape(2, 3) * 0.5 - 1).all(), x
    y = get("y")
    assert y.shape == (4,) and (y == np.array([1, -2, 0.5, 3.0], np.float32)).all(), y
    try:
        from safetensors.numpy import load_file
        from safetensors import safe_open
    except ImportError:
        print("numpy-ok")
        sys.exit(0)
    with safe_open(path, framework="np") as f:
        assert sorted(f.keys()) == ["x", "y"]
        assert f.metadata() == {"format": "pt"}
        assert (f.get_tensor("x") == x).all()
    print("safetensors-ok")
)PY";

bool python_has_numpy() {
  return std::system("python3 -c 'import numpy' >/dev/null 2>&1") == 0;
}

TEST_F(HFFiles, PythonReadsOursAndWeReadPythons) {
  if (!python_has_numpy()) GTEST_SKIP() << "python3 with numpy not found";
  const std::string script = path("cross.py");
  write_bytes(script, kPython);
  const std::string ours = path("ours.safetensors");
  const std::vector<float> x = {-1, -0.5f, 0, 0.5f, 1, 1.5f};
  const std::vector<float> y = {1, -2, 0.5f, 3};
  write_safetensors(ours, {{"x", {2, 3}, x.data()}, {"y", {4}, y.data(), TensorDType::kBF16}},
                    {{"format", "pt"}});
  const std::string out = path("cross.out");
  ASSERT_EQ(std::system(("python3 " + script + " check " + ours + " >" + out + " 2>&1").c_str()), 0)
      << read_bytes(out);
  const std::string said = read_bytes(out);
  EXPECT_TRUE(said.find("numpy-ok") != std::string::npos ||
              said.find("safetensors-ok") != std::string::npos)
      << said;
  if (said.find("safetensors-ok") == std::string::npos)
    std::printf("(the safetensors package is not installed: checked with numpy alone)\n");

  const std::string theirs = path("theirs.safetensors");
  ASSERT_EQ(std::system(("python3 " + script + " write " + theirs + " >" + out + " 2>&1").c_str()),
            0)
      << read_bytes(out);
  const SafetensorsFile f(theirs);
  EXPECT_EQ(f.metadata().at("who"), "python");
  const std::vector<float> z = {-0.5f, -0.25f, 0, 0.25f, 0.5f, 0.75f};
  expect_same_bits(f.read_f32("z.f32"), z);
  expect_same_bits(f.read_f32("a.f16"), {1, -0.5f, 65504, std::ldexp(1.0f, -24)});
  expect_same_bits(f.read_f32("m.f64"), {static_cast<float>(1.0 / 3)});
  EXPECT_EQ(f.at("m.f64").shape, std::vector<int64_t>{});
  std::ifstream hf(theirs + ".hf");
  if (hf.good()) {  // written by the safetensors package
    const SafetensorsFile g(theirs + ".hf");
    EXPECT_EQ(g.metadata().at("format"), "np");
    expect_same_bits(g.read_f32("z.f32"), z);
    expect_same_bits(g.read_f32("a.f16"), {1, -0.5f, 65504, std::ldexp(1.0f, -24)});
  }
}

}  // namespace
}  // namespace remat
