// libFuzzer target: remat's training state file (io/train_state.h).
//
// Input: the state file's bytes.
// Contract checked: load_train_state either succeeds or throws remat::Error; lengths, counts
// and sizes in the header are checked against the file size before anything is allocated. A
// state that loads has num_params(config) params, m and v empty or of that length, and the
// exact file size; if save_train_state accepts it (it refuses non-finite values with an
// Error), it reloads identically and the new file is byte-identical to the input but for the
// reserved field (written 0) and, where that was not 0, the final hash.
#include <unistd.h>

#include <cstring>

#include "io/atomic_file.h"
#include "io/params.h"
#include "io/train_state.h"
#include "kernels/common.h"
#include "tests/fuzz/fuzz_util.h"

using remat_fuzz::MemFile;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  MemFile f(data, size);
  remat::TrainState s;
  try {
    s = remat::load_train_state(f.path());
  } catch (const remat::Error&) {
    return 0;
  }
  const size_t n = remat::num_params(s.config);
  FUZZ_ASSERT(s.params.size() == n);
  FUZZ_ASSERT(s.m.empty() || s.m.size() == n);
  FUZZ_ASSERT(s.v.empty() || s.v.size() == n);
  FUZZ_ASSERT(size ==
              112 + 4 * (s.params.size() + s.m.size() + s.v.size()) + s.extra_json.size() + 8);

  const std::string out = std::string(remat_fuzz::scratch_dir()) + "/state.bin";
  try {
    remat::save_train_state(out, s);
  } catch (const remat::Error&) {
    return 0;  // non-finite values are refused
  }
  const std::vector<uint8_t> bytes = remat::read_file_bytes(out);
  remat::TrainState back = remat::load_train_state(out);
  ::unlink(out.c_str());
  // Byte-identical, but for the reserved uint64 at offset 72 (read and ignored, written 0) and,
  // when the input's was not 0, the hash that covers it.
  constexpr size_t kReserved = 72;
  uint64_t reserved = 0;
  std::memcpy(&reserved, data + kReserved, 8);
  FUZZ_ASSERT(bytes.size() == size);
  FUZZ_ASSERT(std::memcmp(bytes.data(), data, kReserved) == 0);
  FUZZ_ASSERT(bytes[kReserved] == 0 &&
              std::memcmp(bytes.data() + kReserved, bytes.data() + kReserved + 1, 7) == 0);
  const size_t tail = reserved == 0 ? size : size - 8;
  FUZZ_ASSERT(
      std::memcmp(bytes.data() + kReserved + 8, data + kReserved + 8, tail - kReserved - 8) == 0);
  FUZZ_ASSERT(back.step == s.step && back.rng_seed == s.rng_seed &&
              back.extra_json == s.extra_json);
  FUZZ_ASSERT(back.loader.epoch == s.loader.epoch && back.loader.shard == s.loader.shard &&
              back.loader.batch_in_shard == s.loader.batch_in_shard);
  FUZZ_ASSERT(back.params == s.params && back.m == s.m && back.v == s.v);
  return 0;
}
