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

std::string dims_string(const GPT2Config& c) {
  return "maxT=" + std::to_string(c.max_seq_len) + " V=" + std::to_string(c.vocab_size) +
         " L=" + std::to_string(c.num_layers) + " NH=" + std::to_string(c.num_heads) +
         " C=" + std::to_string(c.channels) + " Vp=" + std::to_string(c.padded_vocab);
}

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

void check_config(const GPT2Config& c, const std::string& where) {
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
  // Every factor is < 2^31, so each term (at most 4 factors plus 4 below) fits in 128 bits.
  using u128 = unsigned __int128;
  const u128 Vp = c.padded_vocab, C = c.channels, L = c.num_layers, T = c.max_seq_len;
  const u128 total = Vp * C + T * C + L * (12 * C * C + 13 * C) + 2 * C;
  const u128 limit = static_cast<u128>(1) << 60;  // elements; 4 bytes each stays below 2^63
  if (total >= limit)
    throw Error(where + ": model dimensions overflow: the parameter count of " + dims_string(c) +
                " does not fit in 64 bits");
}

void check_model_matches(const GPT2Config& want, const GPT2Config& got, const std::string& path) {
  struct Field {
    const char* name;
    int want, got;
  };
  const Field fields[] = {{"max_seq_len (maxT)", want.max_seq_len, got.max_seq_len},
                          {"vocab_size (V)", want.vocab_size, got.vocab_size},
                          {"padded_vocab (Vp)", want.padded_vocab, got.padded_vocab},
                          {"num_layers (L)", want.num_layers, got.num_layers},
                          {"num_heads (NH)", want.num_heads, got.num_heads},
                          {"channels (C)", want.channels, got.channels}};
  for (const Field& f : fields)
    if (f.want != f.got)
      throw Error(path + ": model has " + f.name + " = " + std::to_string(f.got) +
                  " but the run expects " + std::to_string(f.want));
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

void write_llmc_model(const std::string& path, const GPT2Config& c, const float* params,
                      int version) {
  if (version != 3 && version != 5)
    throw Error(path + ": cannot write model file version " + std::to_string(version) +
                " (supported: 3 = fp32, 5 = bf16)");
  check_config(c, path);
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
