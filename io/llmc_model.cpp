#include "io/llmc_model.h"

#include <algorithm>
#include <cstring>

#include "base/error.h"
#include "io/atomic_file.h"
#include "io/params.h"

namespace remat {
namespace {

constexpr size_t kHeaderBytes = kModelHeaderInts * sizeof(int32_t);
constexpr size_t kChunk = 1 << 16;  // elements converted per write/read step

size_t elem_size(int version) {
  return version == 5 ? 2 : 4;
}

}  // namespace

uint16_t float_to_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu) != 0)
    return static_cast<uint16_t>((u >> 16) | 0x0040u);  // keep NaN a (quiet) NaN
  const uint32_t lsb = (u >> 16) & 1u;
  return static_cast<uint16_t>((u + 0x7FFFu + lsb) >> 16);
}

float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

void check_model_matches(const ModelConfig& want, const ModelConfig& got, const std::string& path) {
  struct Field {
    const char* name;
    int want, got;
  };
  if (want.family != got.family || want.model_type != got.model_type)
    throw Error(path + ": model is a " + got.model_type + " but the run expects a " +
                want.model_type);
  const Field fields[] = {{"max_seq_len (maxT)", want.max_seq_len, got.max_seq_len},
                          {"vocab_size (V)", want.vocab_size, got.vocab_size},
                          {"padded_vocab (Vp)", want.padded_vocab, got.padded_vocab},
                          {"num_layers (L)", want.num_layers, got.num_layers},
                          {"num_heads (NH)", want.num_heads, got.num_heads},
                          {"channels (C)", want.channels, got.channels},
                          {"num_kv_heads (NKV)", want.kv_heads(), got.kv_heads()},
                          {"intermediate (I)", want.mlp_width(), got.mlp_width()},
                          {"qkv biases", want.qkv_bias, got.qkv_bias},
                          {"tied embeddings", want.tied_embeddings, got.tied_embeddings}};
  for (const Field& f : fields)
    if (f.want != f.got)
      throw Error(path + ": model has " + f.name + " = " + std::to_string(f.got) +
                  " but the run expects " + std::to_string(f.want));
  if (want.rope_scaling != got.rope_scaling || want.rope_factor != got.rope_factor ||
      want.rope_low_freq_factor != got.rope_low_freq_factor ||
      want.rope_high_freq_factor != got.rope_high_freq_factor ||
      want.rope_original_max_pos != got.rope_original_max_pos)
    throw Error(path + ": model's rope scaling '" + got.rope_scaling +
                "' differs from the run's '" + want.rope_scaling + "'");
  if (want.norm_eps != got.norm_eps || want.rope_theta != got.rope_theta)
    throw Error(path + ": model has norm epsilon " + std::to_string(got.norm_eps) +
                " and rope theta " + std::to_string(got.rope_theta) + " but the run expects " +
                std::to_string(want.norm_eps) + " and " + std::to_string(want.rope_theta));
}

ModelFile read_llmc_model(const std::string& path) {
  FileReader r(path);
  int32_t h[kModelHeaderInts];
  if (r.size() < kHeaderBytes)
    throw Error(path + ": truncated model header: the file holds " + std::to_string(r.size()) +
                " bytes, the header alone is " + std::to_string(kHeaderBytes));
  r.read(h, kHeaderBytes, "the model header");
  if (h[0] != kModelMagic)
    throw Error(path + ": not an llm.c model file: expected magic " + std::to_string(kModelMagic) +
                " and found " + std::to_string(h[0]));
  if (h[1] != 3 && h[1] != 5)
    throw Error(path + ": unsupported model file version " + std::to_string(h[1]) +
                " (supported: 3 = fp32, 5 = bf16)");
  ModelFile m;
  m.version = h[1];
  m.config.max_seq_len = h[2];
  m.config.vocab_size = h[3];
  m.config.num_layers = h[4];
  m.config.num_heads = h[5];
  m.config.channels = h[6];
  m.config.padded_vocab = h[7];
  check_config(m.config, path);
  const uint64_t n = num_params(m.config);
  const uint64_t es = elem_size(m.version);
  const uint64_t want = kHeaderBytes + n * es;
  if (r.size() != want)
    throw Error(path + ": file size is " + std::to_string(r.size()) + " bytes but a version " +
                std::to_string(m.version) + " model with " + std::to_string(n) +
                " parameters needs " + std::to_string(want) + " (1024 + " + std::to_string(n) +
                " * " + std::to_string(es) + ")");
  m.params.resize(n);
  if (m.version == 3) {
    r.read(m.params.data(), n * sizeof(float), "the fp32 parameters");
  } else {
    std::vector<uint16_t> buf(std::min<uint64_t>(n, kChunk));
    for (uint64_t i = 0; i < n; i += kChunk) {
      const size_t k = static_cast<size_t>(std::min<uint64_t>(kChunk, n - i));
      r.read(buf.data(), k * 2, "the bf16 parameters");
      for (size_t j = 0; j < k; j++) m.params[i + j] = bf16_to_float(buf[j]);
    }
  }
  return m;
}

void write_llmc_model(const std::string& path, const ModelConfig& c, const float* params,
                      int version) {
  if (version != 3 && version != 5)
    throw Error(path + ": cannot write model file version " + std::to_string(version) +
                " (supported: 3 = fp32, 5 = bf16)");
  check_config(c, path);
  if (c.family != Family::kGPT2)
    throw Error(path + ": llm.c's model file holds GPT-2 models only, not a " + c.model_type);
  int32_t h[kModelHeaderInts] = {};
  h[0] = kModelMagic;
  h[1] = version;
  h[2] = c.max_seq_len;
  h[3] = c.vocab_size;
  h[4] = c.num_layers;
  h[5] = c.num_heads;
  h[6] = c.channels;
  h[7] = c.padded_vocab;
  const size_t n = num_params(c);
  write_file_atomic(path, [&](FILE* f) {
    write_all(f, h, kHeaderBytes, path);
    if (version == 3) {
      write_all(f, params, n * sizeof(float), path);
      return;
    }
    std::vector<uint16_t> buf(std::min(n, kChunk));
    for (size_t i = 0; i < n; i += kChunk) {
      const size_t k = std::min(kChunk, n - i);
      for (size_t j = 0; j < k; j++) buf[j] = float_to_bf16(params[i + j]);
      write_all(f, buf.data(), k * 2, path);
    }
  });
}

}  // namespace remat
