// libFuzzer target: Hugging Face safetensors files (io/safetensors.h).
//
// Input: the file's bytes.
// Contract checked: SafetensorsFile either opens or throws remat::Error, and never allocates
// from an unchecked length (-malloc_limit_mb catches that). A file that opens has tensors
// whose byte ranges tile its data buffer exactly, each of numel * dtype size bytes; every
// tensor reads as bytes, and the float ones read as fp32 (the others are an Error). The F32
// and BF16 tensors written back with write_safetensors read back identically (bit for bit;
// BF16 up to NaN payloads, which the writer quiets), and the same through
// SafetensorsCheckpoint.
#include <unistd.h>

#include <cstring>
#include <map>
#include <memory>
#include <vector>

#include "base/error.h"
#include "io/safetensors.h"
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

bool reads_as_float(remat::TensorDType t) {
  return t == remat::TensorDType::kF32 || t == remat::TensorDType::kBF16 ||
         t == remat::TensorDType::kF16 || t == remat::TensorDType::kF64;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  MemFile f(data, size);
  std::unique_ptr<remat::SafetensorsFile> st;
  try {
    st = std::make_unique<remat::SafetensorsFile>(f.path());
  } catch (const remat::Error&) {
    return 0;
  }
  FUZZ_ASSERT(st->file_size() == size);

  // The ranges tile the data buffer, in the order tensors() gives.
  uint64_t header = 0;
  for (int i = 7; i >= 0; i--) header = (header << 8) | data[i];
  uint64_t at = 0;
  for (const remat::TensorInfo& t : st->tensors()) {
    FUZZ_ASSERT(t.begin == at && t.end >= t.begin);
    FUZZ_ASSERT(t.end - t.begin == t.numel * remat::dtype_size(t.dtype));
    uint64_t n = 1;
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    FUZZ_ASSERT(n == t.numel);
    FUZZ_ASSERT(st->find(t.name) == &t);
    at = t.end;
  }
  FUZZ_ASSERT(8 + header + at == size);

  std::vector<remat::TensorToWrite> out;
  std::vector<std::vector<float>> values;
  values.reserve(st->tensors().size());
  for (const remat::TensorInfo& t : st->tensors()) {
    const std::vector<uint8_t> raw = st->read_bytes(t.name);
    FUZZ_ASSERT(raw.size() == t.end - t.begin);
    FUZZ_ASSERT(raw.empty() ||
                std::memcmp(raw.data(), data + 8 + header + t.begin, raw.size()) == 0);
    if (!reads_as_float(t.dtype)) {
      bool refused = false;
      try {
        st->read_f32(t.name);
      } catch (const remat::Error&) {
        refused = true;
      }
      FUZZ_ASSERT(refused);
      continue;
    }
    values.push_back(st->read_f32(t.name));
    FUZZ_ASSERT(values.back().size() == t.numel);
    if (t.dtype == remat::TensorDType::kF32 || t.dtype == remat::TensorDType::kBF16)
      out.push_back({t.name, t.shape, values.back().data(), t.dtype});
  }

  // Written back (the F32 and BF16 tensors), they read back the same.
  const std::string dir = remat_fuzz::scratch_dir();
  const std::string path = dir + "/back.safetensors";
  remat::write_safetensors(path, out, st->metadata());
  {
    const remat::SafetensorsFile b(path);
    FUZZ_ASSERT(b.metadata() == st->metadata());
    FUZZ_ASSERT(b.tensors().size() == out.size());
    const remat::SafetensorsCheckpoint back(path);
    for (const remat::TensorToWrite& w : out) {
      const remat::TensorInfo& t = back.at(w.name);
      FUZZ_ASSERT(t.dtype == w.dtype && t.shape == w.shape);
      const std::vector<float> want(w.data, w.data + t.numel);
      FUZZ_ASSERT(same_bits(back.read_f32(w.name), want, w.dtype == remat::TensorDType::kBF16));
    }
  }
  ::unlink(path.c_str());
  return 0;
}
