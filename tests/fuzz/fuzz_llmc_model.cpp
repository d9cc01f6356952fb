// libFuzzer target: llm.c model checkpoints, versions 3 (fp32) and 5 (bf16).
//
// Input: the model file's bytes.
// Contract checked: read_llmc_model either succeeds or throws remat::Error (never allocates
// more than the file holds: a header whose shape promises more is an Error before any
// allocation). A file that reads has a config check_config accepts, exactly
// num_params(config) parameters and the size 1024 + n * (4 or 2); written back in the same
// version it reads back identically (bit for bit, NaNs included for v3; v5 values are exact
// bf16 so they survive the round trip too, up to NaN payloads).
#include <unistd.h>

#include <cstring>

#include "io/llmc_model.h"
#include "io/params.h"
#include "kernels/common.h"
#include "tests/fuzz/fuzz_util.h"

using remat_fuzz::MemFile;

namespace {

bool same_bits(const std::vector<float>& a, const std::vector<float>& b, bool nan_any) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); i++) {
    if (nan_any && a[i] != a[i] && b[i] != b[i]) continue;
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  MemFile f(data, size);
  remat::ModelFile m;
  try {
    m = remat::read_llmc_model(f.path());
  } catch (const remat::Error&) {
    return 0;
  }
  remat::check_config(m.config, "fuzz");  // must not throw for a file that read
  const size_t n = remat::num_params(m.config);
  FUZZ_ASSERT(m.params.size() == n);
  FUZZ_ASSERT(m.version == 3 || m.version == 5);
  FUZZ_ASSERT(size == 1024 + n * (m.version == 5 ? 2 : 4));

  const std::string out = std::string(remat_fuzz::scratch_dir()) + "/model.bin";
  remat::write_llmc_model(out, m.config, m.params.data(), m.version);
  remat::ModelFile back = remat::read_llmc_model(out);
  ::unlink(out.c_str());
  FUZZ_ASSERT(back.version == m.version);
  // The configuration holds strings now: compare it field by field (check_model_matches
  // throws naming the first field that differs).
  bool same_config = true;
  try {
    remat::check_model_matches(m.config, back.config, "round trip");
  } catch (const remat::Error&) {
    same_config = false;
  }
  FUZZ_ASSERT(same_config);
  FUZZ_ASSERT(same_bits(back.params, m.params, /*nan_any=*/m.version == 5));
  return 0;
}
