// Small models and data for the model and runtime tests: the tiny configuration, random
// parameters, tokens and shards, and temporary directories. Tests that also run the remat
// program include tests/test_util.h, which builds on this header.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "base/rng.h"
#include "io/config.h"
#include "io/params.h"
#include "io/shards.h"

namespace remat::test {

// L=2, C=32, NH=2 (HD=16), a ragged vocabulary V=67 padded to 128, maxT=16.
inline ModelConfig tiny_config(int layers = 2) {
  ModelConfig c;
  c.num_layers = layers;
  c.num_heads = 2;
  c.channels = 32;
  c.max_seq_len = 16;
  c.vocab_size = 67;
  c.padded_vocab = pad_vocab(67);
  return c;
}

inline std::vector<float> init(const ModelConfig& c, uint64_t seed = 7) {
  std::vector<float> p(num_params(c));
  init_params(p.data(), c, seed);
  return p;
}

inline std::vector<int> random_tokens(size_t n, int V, uint64_t seed) {
  Philox r(seed, 99);
  std::vector<int> t(n);
  for (auto& x : t) x = static_cast<int>(r.next_u32() % V);
  return t;
}

// A fresh directory /tmp/<prefix>_XXXXXX (std::runtime_error when none can be made).
inline std::string make_temp_dir(const std::string& prefix = "remat_test") {
  std::string tmpl = "/tmp/" + prefix + "_XXXXXX";
  if (::mkdtemp(tmpl.data()) == nullptr)
    throw std::runtime_error("cannot create a temporary directory " + tmpl);
  return tmpl;
}

// Removes `path` with its files, unless REMAT_KEEP_TEST_FILES is set (to look at the files of a
// failed run afterwards).
inline void remove_temp_dir(const std::string& path) {
  if (path.empty() || std::getenv("REMAT_KEEP_TEST_FILES")) return;
  std::error_code ec;
  std::filesystem::remove_all(path, ec);
}

// A fresh temporary directory, removed with its files at destruction (see remove_temp_dir).
struct TempDir {
  std::string path;
  explicit TempDir(const std::string& prefix = "remat_test") : path(make_temp_dir(prefix)) {}
  ~TempDir() { remove_temp_dir(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return path + "/" + name; }
};

// Writes a shard of `n` random tokens < V (Philox(seed), the same shard for the same seed).
inline void write_random_shard(const std::string& path, size_t n, int V, uint64_t seed) {
  std::vector<int> t = random_tokens(n, V, seed);
  std::vector<uint16_t> u(t.begin(), t.end());
  write_shard(path, u.data(), u.size());
}

}  // namespace remat::test
