#include "io/train_state.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "base/error.h"
#include "io/atomic_file.h"
#include "io/llmc_model.h"
#include "io/params.h"

namespace remat {
namespace {

constexpr size_t kHeaderBytes = 112;     // version 1: everything before the arrays
constexpr size_t kModelBlockBytes = 72;  // version 2 adds the Llama family's fields
constexpr int kModelInts = 12;
constexpr size_t kModelTypeBytes = 24;
constexpr size_t kChunkBytes = 1 << 20;

// Appends / extracts little-endian scalars of a fixed-layout header.
struct HeaderWriter {
  uint8_t bytes[kHeaderBytes];
  size_t at = 0;
  template <typename T>
  void put(T x) {
    std::memcpy(bytes + at, &x, sizeof(T));
    at += sizeof(T);
  }
};
struct HeaderReader {
  const uint8_t* bytes;
  size_t at = 0;
  template <typename T>
  T get() {
    T x;
    std::memcpy(&x, bytes + at, sizeof(T));
    at += sizeof(T);
    return x;
  }
};

void check_finite(const std::vector<float>& a, const char* name, const ModelConfig& c,
                  const std::string& path) {
  for (size_t i = 0; i < a.size(); i++)
    if (!std::isfinite(a[i]))
      throw Error(path + ": refusing to save a training state with non-finite " + name + "[" +
                  std::to_string(i) + "] = " + std::to_string(a[i]) + " (tensor " +
                  param_element_name(c, i) + ")");
}

}  // namespace

uint64_t fnv1a(const void* data, size_t n, uint64_t h) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  for (size_t i = 0; i < n; i++) {
    h ^= p[i];
    h *= 0x100000001b3ull;
  }
  return h;
}

void save_train_state(const std::string& path, const TrainState& s) {
  check_config(s.config, path);
  const size_t n = num_params(s.config);
  if (s.params.size() != n)
    throw Error(path + ": training state has " + std::to_string(s.params.size()) +
                " params but the config needs " + std::to_string(n));
  if ((!s.m.empty() && s.m.size() != n) || (!s.v.empty() && s.v.size() != n))
    throw Error(path + ": AdamW moments hold m=" + std::to_string(s.m.size()) + ", v=" +
                std::to_string(s.v.size()) + " floats; each must be 0 or " + std::to_string(n));
  check_finite(s.params, "params", s.config, path);
  check_finite(s.m, "m", s.config, path);
  check_finite(s.v, "v", s.config, path);

  HeaderWriter h;
  h.put<uint32_t>(kTrainStateMagic);
  h.put<uint32_t>(kTrainStateVersion);
  h.put<int32_t>(s.config.max_seq_len);
  h.put<int32_t>(s.config.vocab_size);
  h.put<int32_t>(s.config.padded_vocab);
  h.put<int32_t>(s.config.num_layers);
  h.put<int32_t>(s.config.num_heads);
  h.put<int32_t>(s.config.channels);
  h.put<int64_t>(s.step);
  h.put<int64_t>(s.loader.epoch);
  h.put<int64_t>(s.loader.shard);
  h.put<int64_t>(s.loader.batch_in_shard);
  h.put<uint64_t>(s.rng_seed);
  h.put<uint64_t>(0);  // reserved
  h.put<uint64_t>(s.params.size());
  h.put<uint64_t>(s.m.size());
  h.put<uint64_t>(s.v.size());
  h.put<uint64_t>(s.extra_json.size());
  REMAT_CHECK(h.at == kHeaderBytes, "train state header layout");
  // Version 2: the model block (GPT-2 states stay version 1, byte for byte as before).
  uint8_t model_block[kModelBlockBytes] = {};
  const bool v2 = s.config.family != Family::kGPT2;
  if (v2) {
    std::memcpy(h.bytes + 4, &kTrainStateVersion, 4);
    const std::string& rs = s.config.rope_scaling;
    int32_t f[kModelInts] = {1,
                             s.config.num_kv_heads,
                             s.config.intermediate,
                             0,
                             0,
                             (s.config.qkv_bias ? 1 : 0) | (s.config.tied_embeddings ? 2 : 0),
                             rs.empty()       ? 0
                             : rs == "linear" ? 1
                                              : 2,
                             0,
                             0,
                             0,
                             s.config.rope_original_max_pos,
                             0};
    std::memcpy(&f[3], &s.config.norm_eps, 4);
    std::memcpy(&f[4], &s.config.rope_theta, 4);
    std::memcpy(&f[7], &s.config.rope_factor, 4);
    std::memcpy(&f[8], &s.config.rope_low_freq_factor, 4);
    std::memcpy(&f[9], &s.config.rope_high_freq_factor, 4);
    std::memcpy(model_block, f, sizeof f);
    REMAT_REQUIRE(s.config.model_type.size() < kModelTypeBytes,
                  path + ": model type '" + s.config.model_type + "' is too long");
    std::memcpy(model_block + sizeof f, s.config.model_type.data(), s.config.model_type.size());
  } else {
    const uint32_t one = 1;
    std::memcpy(h.bytes + 4, &one, 4);
  }

  write_file_atomic(path, [&](FILE* f) {
    uint64_t hash = kFnvOffset;
    auto put = [&](const void* data, size_t bytes) {
      hash = fnv1a(data, bytes, hash);
      write_all(f, data, bytes, path);
    };
    put(h.bytes, kHeaderBytes);
    if (v2) put(model_block, kModelBlockBytes);
    put(s.params.data(), s.params.size() * sizeof(float));
    put(s.m.data(), s.m.size() * sizeof(float));
    put(s.v.data(), s.v.size() * sizeof(float));
    put(s.extra_json.data(), s.extra_json.size());
    write_all(f, &hash, sizeof(hash), path);
  });
}

TrainState load_train_state(const std::string& path) {
  FileReader r(path);
  if (r.size() < kHeaderBytes + sizeof(uint64_t))
    throw Error(path + ": truncated training state: the file holds " + std::to_string(r.size()) +
                " bytes, less than the " + std::to_string(kHeaderBytes + 8) +
                "-byte header and checksum");
  uint8_t bytes[kHeaderBytes];
  r.read(bytes, kHeaderBytes, "the training state header");
  uint64_t hash = fnv1a(bytes, kHeaderBytes);
  HeaderReader h{bytes};
  const uint32_t magic = h.get<uint32_t>();
  if (magic != kTrainStateMagic)
    throw Error(path + ": not a remat training state: expected magic " +
                std::to_string(kTrainStateMagic) + " and found " + std::to_string(magic));
  const uint32_t version = h.get<uint32_t>();
  if (version != 1 && version != kTrainStateVersion)
    throw Error(path + ": unsupported training state version " + std::to_string(version) +
                " (supported: 1 and " + std::to_string(kTrainStateVersion) + ")");
  TrainState s;
  s.config.max_seq_len = h.get<int32_t>();
  s.config.vocab_size = h.get<int32_t>();
  s.config.padded_vocab = h.get<int32_t>();
  s.config.num_layers = h.get<int32_t>();
  s.config.num_heads = h.get<int32_t>();
  s.config.channels = h.get<int32_t>();
  s.step = h.get<int64_t>();
  s.loader.epoch = h.get<int64_t>();
  s.loader.shard = h.get<int64_t>();
  s.loader.batch_in_shard = h.get<int64_t>();
  s.rng_seed = h.get<uint64_t>();
  (void)h.get<uint64_t>();  // reserved
  const uint64_t np = h.get<uint64_t>(), nm = h.get<uint64_t>(), nv = h.get<uint64_t>();
  const uint64_t ne = h.get<uint64_t>();
  size_t header = kHeaderBytes;
  if (version == 2) {
    header += kModelBlockBytes;
    if (r.size() < header + sizeof(uint64_t))
      throw Error(path + ": truncated training state: the file holds " + std::to_string(r.size()) +
                  " bytes, less than its header and checksum");
    uint8_t mb[kModelBlockBytes];
    r.read(mb, kModelBlockBytes, "the model block");
    hash = fnv1a(mb, kModelBlockBytes, hash);
    int32_t f[kModelInts];
    std::memcpy(f, mb, sizeof f);
    if (f[0] != 1)
      throw Error(path + ": corrupt training state: unknown model family " + std::to_string(f[0]));
    s.config.family = Family::kLlama;
    s.config.num_kv_heads = f[1];
    s.config.intermediate = f[2];
    std::memcpy(&s.config.norm_eps, &f[3], 4);
    std::memcpy(&s.config.rope_theta, &f[4], 4);
    s.config.qkv_bias = (f[5] & 1) != 0;
    s.config.tied_embeddings = (f[5] & 2) != 0;
    if (f[6] < 0 || f[6] > 2)
      throw Error(path + ": corrupt training state: unknown rope scaling " + std::to_string(f[6]));
    s.config.rope_scaling = f[6] == 0 ? "" : f[6] == 1 ? "linear" : "llama3";
    std::memcpy(&s.config.rope_factor, &f[7], 4);
    std::memcpy(&s.config.rope_low_freq_factor, &f[8], 4);
    std::memcpy(&s.config.rope_high_freq_factor, &f[9], 4);
    s.config.rope_original_max_pos = f[10];
    const char* mt = reinterpret_cast<const char*>(mb + sizeof f);
    s.config.model_type.assign(mt, strnlen(mt, kModelTypeBytes - 1));
    if (s.config.model_type != "llama" && s.config.model_type != "qwen2" &&
        s.config.model_type != "mistral")
      throw Error(path + ": corrupt training state: unknown model type '" + s.config.model_type +
                  "'");
  }

  check_config(s.config, path);
  const uint64_t n = num_params(s.config);
  if (np != n || (nm != 0 && nm != n) || (nv != 0 && nv != n))
    throw Error(path + ": corrupt training state: array lengths params=" + std::to_string(np) +
                ", m=" + std::to_string(nm) + ", v=" + std::to_string(nv) +
                " disagree with the config's " + std::to_string(n) + " parameters");
  // n < 2^60 (check_config), so the sum below cannot overflow unless ne is absurd.
  const uint64_t arrays = 4 * (np + nm + nv);
  if (ne > r.size() || arrays > r.size() || header + arrays + ne + sizeof(uint64_t) != r.size()) {
    const bool absurd = ne > r.size() || arrays > r.size();
    const uint64_t want = header + arrays + ne + sizeof(uint64_t);
    throw Error(
        path + ": " + (absurd || want > r.size() ? "truncated or corrupt" : "corrupt") +
        " training state: its header describes " +
        (absurd ? std::string("more bytes than the file holds") : std::to_string(want) + " bytes") +
        " but the file holds " + std::to_string(r.size()) + " bytes");
  }

  auto read_floats = [&](std::vector<float>& a, uint64_t count, const char* what) {
    a.resize(count);
    uint8_t* dst = reinterpret_cast<uint8_t*>(a.data());
    const uint64_t total = count * sizeof(float);
    for (uint64_t done = 0; done < total;) {
      const size_t k = static_cast<size_t>(std::min<uint64_t>(kChunkBytes, total - done));
      r.read(dst + done, k, what);
      hash = fnv1a(dst + done, k, hash);
      done += k;
    }
  };
  read_floats(s.params, np, "the parameters");
  read_floats(s.m, nm, "the AdamW m moments");
  read_floats(s.v, nv, "the AdamW v moments");
  s.extra_json.resize(ne);
  r.read(s.extra_json.data(), ne, "the extra JSON");
  hash = fnv1a(s.extra_json.data(), ne, hash);
  uint64_t stored;
  r.read(&stored, sizeof(stored), "the checksum");
  if (stored != hash)
    throw Error(path + ": checksum mismatch: the training state is corrupt (stored FNV-1a " +
                std::to_string(stored) + ", computed " + std::to_string(hash) + ")");
  return s;
}

}  // namespace remat
