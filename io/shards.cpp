#include "io/shards.h"

#include <glob.h>

#include <algorithm>
#include <climits>

#include "base/error.h"
#include "base/rng.h"
#include "io/atomic_file.h"

namespace remat {
namespace {

constexpr size_t kHeaderBytes = kShardHeaderInts * sizeof(int32_t);

// A validated shard header: the token count and width.
struct ShardHeader {
  int64_t count;
  int width;  // bytes per token: 2 (version 1) or 4 (version 7)
};

// Validates a shard's header against the file size; the reader is left at the first token.
ShardHeader read_shard_header(FileReader& r) {
  const std::string& path = r.path();
  if (r.size() < kHeaderBytes)
    throw Error(path + ": truncated shard header: the file holds " + std::to_string(r.size()) +
                " bytes, the header alone is " + std::to_string(kHeaderBytes));
  int32_t h[kShardHeaderInts];
  r.read(h, kHeaderBytes, "the shard header");
  if (h[0] != kShardMagic && h[0] != kShardMagic32)
    throw Error(path + ": not a token shard: expected magic " + std::to_string(kShardMagic) +
                " (uint16 tokens) or " + std::to_string(kShardMagic32) +
                " (uint32 tokens) and found " + std::to_string(h[0]));
  const int want_version = h[0] == kShardMagic ? 1 : 7;
  if (h[1] != want_version)
    throw Error(path + ": unsupported shard version " + std::to_string(h[1]) + " with magic " +
                std::to_string(h[0]) + " (supported: 1 with magic " + std::to_string(kShardMagic) +
                ", 7 with magic " + std::to_string(kShardMagic32) + ")");
  if (h[2] < 0)
    throw Error(path + ": shard header gives a negative token count " + std::to_string(h[2]));
  const int width = h[0] == kShardMagic ? 2 : 4;
  const uint64_t have = (r.size() - kHeaderBytes) / width;
  const uint64_t want_size = kHeaderBytes + width * static_cast<uint64_t>(h[2]);
  if (r.size() != want_size)
    throw Error(path + ": shard header says " + std::to_string(h[2]) + " tokens (" +
                std::to_string(want_size) + " bytes) but the file holds " +
                std::to_string(r.size()) + " bytes (" + std::to_string(have) + " tokens)");
  return {h[2], width};
}

void write_shard_of(const std::string& path, const void* tokens, size_t n, int width) {
  if (n > static_cast<size_t>(INT32_MAX))
    throw Error(path + ": " + std::to_string(n) + " tokens do not fit one shard (at most " +
                std::to_string(INT32_MAX) + ")");
  int32_t h[kShardHeaderInts] = {};
  h[0] = width == 2 ? kShardMagic : kShardMagic32;
  h[1] = width == 2 ? 1 : 7;
  h[2] = static_cast<int32_t>(n);
  write_file_atomic(path, [&](FILE* f) {
    write_all(f, h, kHeaderBytes, path);
    write_all(f, tokens, n * width, path);
  });
}

}  // namespace

void write_shard(const std::string& path, const uint16_t* tokens, size_t n) {
  write_shard_of(path, tokens, n, 2);
}

void write_shard_u32(const std::string& path, const uint32_t* tokens, size_t n) {
  write_shard_of(path, tokens, n, 4);
}

std::vector<uint16_t> read_shard(const std::string& path) {
  FileReader r(path);
  const ShardHeader h = read_shard_header(r);
  if (h.width != 2)
    throw Error(path + ": a shard of uint32 tokens (version 7); read it with read_shard_u32");
  std::vector<uint16_t> tokens(static_cast<size_t>(h.count));
  r.read(tokens.data(), tokens.size() * sizeof(uint16_t), "the shard tokens");
  return tokens;
}

std::vector<uint32_t> read_shard_u32(const std::string& path) {
  FileReader r(path);
  const ShardHeader h = read_shard_header(r);
  std::vector<uint32_t> tokens(static_cast<size_t>(h.count));
  if (h.width == 4) {
    r.read(tokens.data(), tokens.size() * sizeof(uint32_t), "the shard tokens");
  } else {
    std::vector<uint16_t> narrow(tokens.size());
    r.read(narrow.data(), narrow.size() * sizeof(uint16_t), "the shard tokens");
    std::copy(narrow.begin(), narrow.end(), tokens.begin());
  }
  return tokens;
}

std::vector<std::string> expand_glob(const std::string& pattern) {
  glob_t g{};
  const int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  std::vector<std::string> out;
  if (rc == 0)
    for (size_t i = 0; i < g.gl_pathc; i++) out.emplace_back(g.gl_pathv[i]);
  ::globfree(&g);
  if (rc == GLOB_NOSPACE) throw Error(pattern + ": out of memory expanding the pattern");
  if (rc == GLOB_ABORTED) throw Error(pattern + ": read error while expanding the pattern");
  if (out.empty()) throw Error(pattern + ": no files match this pattern");
  std::sort(out.begin(), out.end());
  return out;
}

DataLoader::DataLoader(const std::string& pattern, int B, int T, int vocab_size, bool shuffle,
                       uint64_t seed)
    : B_(B), T_(T), vocab_size_(vocab_size), shuffle_(shuffle), seed_(seed) {
  if (B <= 0 || T <= 0)
    throw Error(pattern + ": batch shape must be positive (B=" + std::to_string(B) +
                ", T=" + std::to_string(T) + ")");
  if (vocab_size <= 0)
    throw Error(pattern + ": vocab size must be positive, got " + std::to_string(vocab_size));
  files_ = expand_glob(pattern);
  const int64_t need = static_cast<int64_t>(B) * T + 1;
  for (const std::string& path : files_) {
    FileReader r(path);
    const int64_t n = read_shard_header(r).count;
    if (n < need)
      throw Error(path + ": shard holds " + std::to_string(n) +
                  " tokens but one batch of B=" + std::to_string(B) + ", T=" + std::to_string(T) +
                  " needs B*T+1 = " + std::to_string(need));
    counts_.push_back(n);
  }
  enter_position();
}

void DataLoader::check_index(int shard) const {
  if (shard < 0 || shard >= num_shards())
    throw Error("DataLoader: shard index " + std::to_string(shard) + " out of range [0, " +
                std::to_string(num_shards()) + ")");
}

int64_t DataLoader::tokens_in_shard(int shard) const {
  check_index(shard);
  return counts_[shard];
}

int64_t DataLoader::batches_in_shard(int shard) const {
  check_index(shard);
  return (counts_[shard] - 1) / (static_cast<int64_t>(B_) * T_);
}

void DataLoader::shuffle_into(std::vector<int64_t>& order, uint64_t counter_base) const {
  Philox rng(seed_, static_cast<uint64_t>(state_.epoch), counter_base);
  for (size_t i = order.size(); i > 1; i--) {
    // Uniform j in [0, i - 1] by rejection: accept x below the largest multiple of i.
    const uint64_t bound = i;
    const uint64_t limit = (uint64_t{1} << 32) - ((uint64_t{1} << 32) % bound);
    uint64_t x;
    do {
      x = rng.next_u32();
    } while (x >= limit);
    std::swap(order[i - 1], order[x % bound]);
  }
}

void DataLoader::enter_position() {
  if (order_epoch_ != state_.epoch) {
    shard_order_.resize(files_.size());
    for (size_t i = 0; i < files_.size(); i++) shard_order_[i] = static_cast<int64_t>(i);
    if (shuffle_) shuffle_into(shard_order_, 0);
    order_epoch_ = state_.epoch;
  }
  const int64_t file = shard_order_[state_.shard];
  if (loaded_ != file) {
    loaded_ = -1;
    tokens_ = read_shard_u32(files_[file]);
    if (static_cast<int64_t>(tokens_.size()) != counts_[file])
      throw Error(files_[file] + ": shard changed while in use (had " +
                  std::to_string(counts_[file]) + " tokens, now " + std::to_string(tokens_.size()) +
                  ")");
    for (size_t i = 0; i < tokens_.size(); i++)
      if (tokens_[i] >= static_cast<uint32_t>(vocab_size_))
        throw Error(files_[file] + ": token at index " + std::to_string(i) + " has value " +
                    std::to_string(tokens_[i]) + ", not below the vocab size " +
                    std::to_string(vocab_size_));
    loaded_ = file;
    loaded_epoch_ = -1;
  }
  if (loaded_epoch_ != state_.epoch) {
    batch_order_.resize(static_cast<size_t>(batches_in_shard(static_cast<int>(file))));
    for (size_t i = 0; i < batch_order_.size(); i++) batch_order_[i] = static_cast<int64_t>(i);
    if (shuffle_) shuffle_into(batch_order_, (static_cast<uint64_t>(file) + 1) << 40);
    loaded_epoch_ = state_.epoch;
  }
}

void DataLoader::next_batch(int* inputs, int* targets) {
  enter_position();
  const int64_t BT = static_cast<int64_t>(B_) * T_;
  const uint32_t* src = tokens_.data() + batch_order_[state_.batch_in_shard] * BT;
  for (int64_t i = 0; i < BT; i++) {  // below vocab_size_, so they fit an int
    inputs[i] = static_cast<int>(src[i]);
    targets[i] = static_cast<int>(src[i + 1]);
  }
  // Advance; the next shard is loaded by the next call.
  if (++state_.batch_in_shard == static_cast<int64_t>(batch_order_.size())) {
    state_.batch_in_shard = 0;
    if (++state_.shard == num_shards()) {
      state_.shard = 0;
      state_.epoch++;
    }
  }
}

void DataLoader::restore(const LoaderState& s) {
  if (s.epoch < 0 || s.shard < 0 || s.shard >= num_shards() || s.batch_in_shard < 0)
    throw Error("DataLoader: cannot restore position (epoch " + std::to_string(s.epoch) +
                ", shard " + std::to_string(s.shard) + ", batch " +
                std::to_string(s.batch_in_shard) + "): " + std::to_string(num_shards()) +
                " shards match");
  const LoaderState old = state_;
  std::string problem;
  try {
    state_ = s;
    order_epoch_ = -1;  // rebuild the order for the restored epoch
    enter_position();
    if (s.batch_in_shard >= static_cast<int64_t>(batch_order_.size()))
      problem = files_[loaded_] + ": cannot restore batch " + std::to_string(s.batch_in_shard) +
                ": the shard has " + std::to_string(batch_order_.size()) + " batches";
  } catch (const Error&) {
    state_ = old;
    order_epoch_ = -1;
    throw;
  }
  if (!problem.empty()) {
    state_ = old;
    order_epoch_ = -1;
    throw Error(problem);
  }
}

void DataLoader::reset() {
  restore(LoaderState{});
}

}  // namespace remat
