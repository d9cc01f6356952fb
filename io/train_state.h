// The whole training state in one file, written atomically, so a resumed run continues bit
// for bit and a crash never leaves a corrupt checkpoint behind.
//
// Layout (little endian): uint32 magic 0x54534D52 ('RMST'), uint32 version 1; int32 maxT, V,
// Vp, L, NH, C; int64 step; int64 loader epoch, shard, batch_in_shard; uint64 rng_seed,
// uint64 reserved (written 0, ignored on read: once a counter nothing used); uint64 lengths of
// params, m, v (floats) and extra_json (bytes); the params, m and v arrays (fp32); the extra_json
// bytes; then a uint64 FNV-1a hash of every byte before it. GPT-2 states are version 1.
// Version 2 (the Llama family) puts a 72-byte model block after the 112-byte header, before
// the arrays: int32 family (1 = Llama family), NKV, I; float32 norm epsilon, rope theta;
// int32 flags (1: qkv biases, 2: tied embedding); int32 rope scaling (0 none, 1 linear,
// 2 llama3); float32 its factor, low and high frequency factors; int32 its original maximum
// position, int32 reserved; the model type, 24 bytes zero-padded.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "io/config.h"
#include "io/shards.h"

namespace remat {

constexpr uint32_t kTrainStateMagic = 0x54534D52;  // 'RMST'
constexpr uint32_t kTrainStateVersion = 2;

struct TrainState {
  ModelConfig config;
  int64_t step = 0;           // optimizer steps taken
  std::vector<float> params;  // (num_params(config))
  std::vector<float> m, v;    // AdamW moments: empty (none yet) or (num_params(config))
  LoaderState loader;         // where the training data loader stands
  // The run's --seed (initialisation, shuffling, sampling): a resume takes it, and refuses
  // another given --seed. States written before remat recorded it hold 0.
  uint64_t rng_seed = 0;
  std::string extra_json;  // free text owned by the trainer (e.g. hyperparameters)
};

// Writes atomically (io/atomic_file.h). Refuses with an Error -- writing nothing -- if the
// config is invalid, the array lengths disagree with it, or any params, m or v entry is not
// finite (the message names the array, the element index and its parameter tensor).
void save_train_state(const std::string& path, const TrainState& s);

// Error naming the path for: a missing file, a wrong magic or version, lengths that disagree
// with the config or the file size (checked before allocating), a truncated file, or a
// checksum mismatch.
TrainState load_train_state(const std::string& path);

// FNV-1a 64-bit, continuing from `h` (start with kFnvOffset).
constexpr uint64_t kFnvOffset = 0xcbf29ce484222325ull;
uint64_t fnv1a(const void* data, size_t n, uint64_t h = kFnvOffset);

}  // namespace remat
