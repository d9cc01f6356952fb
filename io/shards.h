// llm.c's token shards and the data loader that walks them.
//
// Shard layout (little endian): a header of 256 int32 -- [0] magic, [1] version, [2] token
// count n -- then n tokens: magic 20240520 with version 1 for uint16 tokens (GPT-2), magic
// 20240801 with version 7 for uint32 tokens (llm.c's dev/data/data_common.py "llama-3").
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace remat {

constexpr int32_t kShardMagic = 20240520;    // version 1, uint16 tokens
constexpr int32_t kShardMagic32 = 20240801;  // version 7, uint32 tokens
constexpr int kShardHeaderInts = 256;

// Writes a shard atomically (io/atomic_file.h). n must fit the header's int32.
void write_shard(const std::string& path, const uint16_t* tokens, size_t n);
// The same as a uint32 shard (magic 20240801, version 7).
void write_shard_u32(const std::string& path, const uint32_t* tokens, size_t n);

// Reads a whole uint16 shard, validating magic, version and header count against the file
// size; a uint32 shard is an Error pointing to read_shard_u32.
std::vector<uint16_t> read_shard(const std::string& path);
// Reads a whole shard of either kind, its tokens widened to uint32.
std::vector<uint32_t> read_shard_u32(const std::string& path);

// The paths matching a glob(3) pattern, sorted bytewise. Error naming the pattern if none.
std::vector<std::string> expand_glob(const std::string& pattern);

// Where the loader stands: the next batch served is batch `batch_in_shard` (a position in
// the shard's batch order) of the shard at position `shard` in epoch `epoch`'s shard order.
// Without shuffle, positions are file indices and batch indices.
struct LoaderState {
  int64_t epoch = 0;
  int64_t shard = 0;
  int64_t batch_in_shard = 0;
};

// Serves (B, T) batches of int32 tokens from the shards matching a glob pattern.
//
// Batch k of a shard holds tokens [k*B*T, k*B*T + B*T + 1): inputs are the first B*T,
// targets the same shifted by one (llm.c's order). A shard with n tokens has (n - 1) / (B*T)
// batches; the tail is not used. When a shard is used up the loader moves to the next one,
// and after the last one it starts a new epoch with the first one.
//
// Shuffle: with shuffle = true each epoch e permutes the shard order, and each shard's batch
// order, by a Fisher-Yates shuffle driven by Philox(seed, stream = e): the shard order draws
// from counter 0, the batch order of file index s from counter (s + 1) * 2^40. Draws in
// [0, i] use rejection sampling (no modulo bias). The order therefore depends only on (seed,
// epoch), so restore() reproduces it.
//
// Every shard's header is validated when the loader is built (magic, version, count against
// the file size, at least B*T + 1 tokens; uint16 and uint32 shards may be mixed); its tokens are
// read into memory when the loader reaches it and every token is checked < vocab_size. Errors name
// the file.
class DataLoader {
 public:
  DataLoader(const std::string& pattern, int B, int T, int vocab_size, bool shuffle, uint64_t seed);

  // Fills inputs[B*T] and targets[B*T] (row-major (B, T)) and advances by one batch.
  void next_batch(int* inputs, int* targets);

  LoaderState state() const { return state_; }
  // Continues from a state returned by state(); Error if it does not fit these shards.
  void restore(const LoaderState& s);
  // Back to epoch 0, first shard, first batch.
  void reset();

  int num_shards() const { return static_cast<int>(files_.size()); }
  // Batches in the shard with file index `shard`.
  int64_t batches_in_shard(int shard) const;
  // Tokens in the shard with file index `shard`.
  int64_t tokens_in_shard(int shard) const;
  const std::vector<std::string>& files() const { return files_; }
  int B() const { return B_; }
  int T() const { return T_; }

 private:
  void check_index(int shard) const;
  void enter_position();  // computes orders for state_ and loads the shard it points at
  void shuffle_into(std::vector<int64_t>& order, uint64_t counter_base) const;

  std::vector<std::string> files_;
  std::vector<int64_t> counts_;  // tokens per file
  int B_, T_, vocab_size_;
  bool shuffle_;
  uint64_t seed_;
  LoaderState state_;
  int64_t order_epoch_ = -1;          // the epoch shard_order_ was built for
  std::vector<int64_t> shard_order_;  // position -> file index
  int64_t loaded_ = -1;               // file index whose tokens_ are loaded
  int64_t loaded_epoch_ = -1;         // the epoch batch_order_ was built for
  std::vector<int64_t> batch_order_;  // position -> batch index in the loaded shard
  std::vector<uint32_t> tokens_;      // the loaded shard, widened (4 bytes a token)
};

}  // namespace remat
