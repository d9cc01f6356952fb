// Hugging Face safetensors files: one file, a checkpoint directory (one file or shards named by
// model.safetensors.index.json), and the writers of both.
//
// The format: a little-endian uint64 N, then N bytes of JSON (beginning with '{', padded with
// spaces) mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} plus an
// optional "__metadata__" object of strings, then the data buffer, which the tensors' byte
// ranges (relative to its start) must cover exactly, without overlaps or holes. Little-endian,
// row-major.
//
// Every header is validated in full before anything is allocated from it or read through it.
// Errors are remat::Error naming the file and the problem, with no source location.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace remat {

// The element types of the format, by its names ("F32", "BF16", ...).
enum class TensorDType {
  kBool,
  kU8,
  kI8,
  kF8E5M2,
  kF8E4M3,
  kI16,
  kU16,
  kF16,
  kBF16,
  kI32,
  kU32,
  kF32,
  kF64,
  kI64,
  kU64
};
const char* dtype_name(TensorDType t);  // the format's name: "F32", "BF16", "F8_E4M3", ...
size_t dtype_size(TensorDType t);       // bytes per element

// One tensor of a file's header.
struct TensorInfo {
  std::string name;
  TensorDType dtype = TensorDType::kF32;
  std::vector<int64_t> shape;  // row-major; {} is a scalar (one element)
  uint64_t numel = 0;          // product of shape
  uint64_t begin = 0;          // its bytes are [begin, end) of the data buffer
  uint64_t end = 0;
};

// "[2, 3]" for error messages and logs.
std::string shape_string(const std::vector<int64_t>& shape);

// A safetensors file whose header has been read and checked; tensor data is read on demand.
class SafetensorsFile {
 public:
  // Reads and validates the header. Error naming `path` for: a file shorter than 8 bytes, a
  // header length past the end of the file (or above the format's 100 MB), a header that is
  // not a JSON object (or has a key twice), an entry without a valid dtype, shape or
  // data_offsets, an unknown dtype, a byte range that disagrees with dtype and shape, that
  // ends past the data, or overlaps another, a data buffer not covered exactly, or an
  // __metadata__ that is not an object of strings.
  explicit SafetensorsFile(const std::string& path);

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // by ascending offset
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  uint64_t file_size() const { return file_size_; }

  const TensorInfo* find(const std::string& name) const;  // nullptr when absent
  // The tensor called `name`; Error naming the file, the name and a few names it holds.
  const TensorInfo& at(const std::string& name) const;

  // The tensor's values as fp32: F32, BF16 and F16 exactly, F64 rounded to nearest.
  // Other dtypes are an Error naming the tensor and its dtype.
  std::vector<float> read_f32(const std::string& name) const;
  // The same into dst, which holds exactly n = numel floats (else an Error).
  void read_f32(const std::string& name, float* dst, size_t n) const;
  // The tensor's bytes as stored.
  std::vector<uint8_t> read_bytes(const std::string& name) const;

 private:
  void read_range(uint64_t offset, void* dst, size_t n, const std::string& what) const;

  std::string path_;
  uint64_t file_size_ = 0;
  uint64_t data_start_ = 0;  // 8 + N
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> by_name_;  // name -> index in tensors_
  std::map<std::string, std::string> metadata_;
};

// The tensors of a Hugging Face checkpoint, found by name in whichever file holds them.
class SafetensorsCheckpoint {
 public:
  // `path` is a directory (its model.safetensors if present, as transformers prefers, else
  // its model.safetensors.index.json), an index file (*.index.json), or a .safetensors file.
  // An index must be a JSON object whose "weight_map" maps each tensor name to a shard file
  // name in the index's directory; every shard is opened and checked, and a tensor the index
  // maps to a shard that does not hold it is an Error naming both. Tensors a shard holds but
  // the index does not list are not seen (as in transformers).
  explicit SafetensorsCheckpoint(const std::string& path);

  const std::string& path() const { return path_; }  // the index, or the single file
  std::vector<std::string> names() const;            // sorted
  bool contains(const std::string& name) const { return where_.count(name) > 0; }
  // Error naming the checkpoint, the name and a few names it holds.
  const TensorInfo& at(const std::string& name) const;
  const SafetensorsFile& file_of(const std::string& name) const;
  size_t num_files() const { return files_.size(); }

  std::vector<float> read_f32(const std::string& name) const;  // as SafetensorsFile::read_f32
  void read_f32(const std::string& name, float* dst, size_t n) const;

 private:
  size_t file_index(const std::string& name) const;  // Error when absent

  std::string path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index in files_
};

// One tensor to write: fp32 values stored as F32 (bit for bit) or BF16 (nearest, ties to
// even; NaN stays NaN).
struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  const float* data = nullptr;            // (numel(shape)) fp32, borrowed until the write returns
  TensorDType dtype = TensorDType::kF32;  // kF32 or kBF16
};

// Writes one safetensors file atomically (io/atomic_file.h) as the Hugging Face library
// does: tensors laid out by descending element size, then by name (for one dtype: by name);
// the compact JSON header (__metadata__ first, when not empty) padded with spaces to a
// multiple of 8 bytes. Names must be unique and not "__metadata__".
// transformers refuses a file whose metadata lacks "format": "pt" (no metadata at all is
// accepted); write_safetensors_checkpoint adds it.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes a checkpoint directory (which must exist) as transformers' save_pretrained does:
// DIR/model.safetensors when the tensors' bytes fit in max_shard_bytes, else
// DIR/model-0000k-of-0000n.safetensors, filled with the tensors in the order given (a shard
// is closed when the next tensor would take it past max_shard_bytes), and
// DIR/model.safetensors.index.json
// ({"metadata": {"total_size"}, "weight_map"}), written last. The metadata gets "format":
// "pt" unless it has a "format". Returns the paths written.
constexpr uint64_t kDefaultMaxShardBytes = 5000000000ull;  // transformers' "5GB"
std::vector<std::string> write_safetensors_checkpoint(
    const std::string& dir, const std::vector<TensorToWrite>& tensors,
    uint64_t max_shard_bytes = kDefaultMaxShardBytes,
    const std::map<std::string, std::string>& metadata = {});

}  // namespace remat
