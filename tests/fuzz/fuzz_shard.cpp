// libFuzzer target: llm.c token shards (read_shard) and the DataLoader that walks them.
//
// Input: 4 bytes of loader settings, then the shard file's bytes.
//   [0] B = 1 + b0 % 4, and shuffle when b0 & 0x80
//   [1] T = 1 + b1 % 32
//   [2..3] vocab size = 1 + (b2 | b3 << 8), in [1, 65536]
// Contract checked: read_shard and the DataLoader either succeed or throw remat::Error; a
// loaded shard's token count matches its header; every batch the loader serves holds tokens
// below the vocab size that are the shard's own tokens at the documented offsets (without
// shuffle); restore() of any state either fits or throws Error and leaves the loader usable.
#include <cstring>
#include <vector>

#include "io/shards.h"
#include "kernels/common.h"
#include "tests/fuzz/fuzz_util.h"

using remat_fuzz::byte_at;
using remat_fuzz::MemFile;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const uint32_t b0 = byte_at(data, size, 0), b1 = byte_at(data, size, 1);
  const int B = 1 + static_cast<int>(b0 % 4);
  const bool shuffle = (b0 & 0x80) != 0;
  const int T = 1 + static_cast<int>(b1 % 32);
  const int vocab = 1 + static_cast<int>(byte_at(data, size, 2) | byte_at(data, size, 3) << 8);
  const size_t skip = size < 4 ? size : 4;
  MemFile f(data + skip, size - skip);

  std::vector<uint16_t> tokens;
  try {
    tokens = remat::read_shard(f.path());
  } catch (const remat::Error&) {
    return 0;
  }
  // A shard that reads is exactly 1024 header bytes plus its tokens.
  FUZZ_ASSERT(1024 + 2 * tokens.size() == size - skip);

  try {
    remat::DataLoader dl(f.path(), B, T, vocab, shuffle, /*seed=*/b0 * 7919u);
    const int64_t BT = static_cast<int64_t>(B) * T;
    FUZZ_ASSERT(dl.num_shards() == 1);
    FUZZ_ASSERT(dl.tokens_in_shard(0) == static_cast<int64_t>(tokens.size()));
    const int64_t batches = dl.batches_in_shard(0);
    FUZZ_ASSERT(batches >= 1 && batches * BT + 1 <= static_cast<int64_t>(tokens.size()));
    std::vector<int> in(BT), tg(BT);
    // Two epochs, bounded so that one input stays fast.
    const int64_t serve = std::min<int64_t>(2 * batches, 64);
    for (int64_t k = 0; k < serve; k++) {
      const remat::LoaderState st = dl.state();
      dl.next_batch(in.data(), tg.data());
      for (int64_t i = 0; i < BT; i++) {
        FUZZ_ASSERT(in[i] >= 0 && in[i] < vocab && tg[i] >= 0 && tg[i] < vocab);
        if (i + 1 < BT) FUZZ_ASSERT(tg[i] == in[i + 1]);
      }
      if (!shuffle) {
        const int64_t at = st.batch_in_shard * BT;
        FUZZ_ASSERT(in[0] == tokens[at] && tg[BT - 1] == tokens[at + BT]);
      }
    }
    // Restore to a state picked by the input: valid ones continue, others are Errors.
    remat::LoaderState s;
    s.epoch = static_cast<int64_t>(byte_at(data, size, 1024 + 4)) - 2;
    s.shard = static_cast<int64_t>(byte_at(data, size, 1024 + 5)) % 3 - 1;
    s.batch_in_shard = static_cast<int64_t>(byte_at(data, size, 1024 + 6)) - 1;
    try {
      dl.restore(s);
      dl.next_batch(in.data(), tg.data());
    } catch (const remat::Error&) {
      dl.next_batch(in.data(), tg.data());  // still usable after a refused restore
    }
    dl.reset();
    FUZZ_ASSERT(dl.state().epoch == 0 && dl.state().batch_in_shard == 0);
  } catch (const remat::Error&) {
    // Too short for one batch, or a token past the vocabulary.
  }
  return 0;
}
