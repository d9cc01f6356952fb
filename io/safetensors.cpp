#include "io/safetensors.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "base/error.h"
#include "io/atomic_file.h"
#include "io/llmc_model.h"  // float_to_bf16, bf16_to_float

namespace remat {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data are little-endian");

namespace {

using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;

// The format's limit (the Hugging Face reader refuses larger headers).
constexpr uint64_t kMaxHeaderBytes = 100000000;
constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

struct DTypeName {
  TensorDType t;
  const char* name;
  size_t size;
};
constexpr DTypeName kDTypes[] = {
    {TensorDType::kBool, "BOOL", 1},      {TensorDType::kU8, "U8", 1},
    {TensorDType::kI8, "I8", 1},          {TensorDType::kF8E5M2, "F8_E5M2", 1},
    {TensorDType::kF8E4M3, "F8_E4M3", 1}, {TensorDType::kI16, "I16", 2},
    {TensorDType::kU16, "U16", 2},        {TensorDType::kF16, "F16", 2},
    {TensorDType::kBF16, "BF16", 2},      {TensorDType::kI32, "I32", 4},
    {TensorDType::kU32, "U32", 4},        {TensorDType::kF32, "F32", 4},
    {TensorDType::kF64, "F64", 8},        {TensorDType::kI64, "I64", 8},
    {TensorDType::kU64, "U64", 8},
};

bool parse_dtype(const std::string& s, TensorDType* out) {
  for (const DTypeName& d : kDTypes) {
    if (s == d.name) {
      *out = d.t;
      return true;
    }
  }
  return false;
}

std::string known_dtypes() {
  std::string o;
  for (const DTypeName& d : kDTypes) o += std::string(o.empty() ? "" : ", ") + d.name;
  return o;
}

bool mul_overflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}

// The message of a nlohmann exception without its "[json.exception.parse_error.101] " tag.
std::string json_message(const std::exception& e) {
  std::string m = e.what();
  if (m.rfind("[json.exception.", 0) == 0) {
    const size_t close = m.find("] ");
    if (close != std::string::npos) m = m.substr(close + 2);
  }
  return m;
}

// Parses `text` as JSON, refusing a key that appears twice in one object (the format forbids
// it; nlohmann would keep the last). `what` names the document for errors.
json parse_strict(const std::string& text, const std::string& what) {
  std::vector<std::set<std::string>> keys;  // one per open object
  std::string duplicate;
  json::parser_callback_t cb = [&](int, json::parse_event_t ev, json& parsed) {
    if (ev == json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (ev == json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (ev == json::parse_event_t::key && !keys.empty() && parsed.is_string()) {
      const std::string& k = parsed.get_ref<const std::string&>();
      if (!keys.back().insert(k).second && duplicate.empty()) duplicate = k;
    }
    return true;
  };
  json j;
  try {
    j = json::parse(text, cb);
  } catch (const json::exception& e) {
    throw Error(what + " is not valid JSON: " + json_message(e));
  }
  REMAT_REQUIRE(duplicate.empty(), what + " has the key '" + duplicate + "' twice");
  return j;
}

std::string type_of(const json& j) {
  return j.type_name();  // "object", "array", "string", "number", ...
}

// A value for a message: a scalar as JSON, a short flat list as JSON, else its type (dump()
// recurses, so a deeply nested value is never dumped).
std::string shown(const json& j) {
  if (j.is_primitive()) return j.dump(-1, ' ', false, json::error_handler_t::replace);
  if (j.is_array() && j.size() <= 8) {
    bool flat = true;
    for (const json& e : j) flat = flat && e.is_primitive();
    if (flat) return j.dump(-1, ' ', false, json::error_handler_t::replace);
  }
  return "(a JSON " + type_of(j) + " of " + std::to_string(j.size()) + ")";
}

// A few names of `names` to offer beside one that is absent: those sharing the longest
// prefix with it, then alphabetical.
template <typename Map>
std::string some_names(const Map& names, const std::string& wanted) {
  if (names.empty()) return "it holds no tensors";
  std::vector<std::pair<size_t, std::string>> scored;
  for (const auto& kv : names) {
    const std::string& n = kv.first;
    size_t k = 0;
    while (k < n.size() && k < wanted.size() && n[k] == wanted[k]) k++;
    scored.emplace_back(k, n);
  }
  std::stable_sort(scored.begin(), scored.end(),
                   [](const auto& a, const auto& b) { return a.first > b.first; });
  const size_t show = std::min<size_t>(scored.size(), 5);
  std::string o = "it holds " + std::to_string(names.size()) + " tensor" +
                  (names.size() == 1 ? "" : "s") + (scored.size() > show ? ", e.g. " : ": ");
  for (size_t i = 0; i < show; i++) o += (i ? ", '" : "'") + scored[i].second + "'";
  return o;
}

// IEEE half -> float, exact (subnormals, infinities and NaN payloads included).
float f16_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    const float v = std::ldexp(static_cast<float>(mant), -24);  // zero or subnormal: exact
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// A non-negative JSON integer, or false.
bool get_u64(const json& j, uint64_t* out) {
  if (!j.is_number_unsigned()) return false;  // nlohmann: non-negative integers only
  *out = j.get<uint64_t>();
  return true;
}

// Element bytes of a tensor entry, checking the products for overflow.
bool tensor_bytes(const TensorInfo& t, uint64_t* numel, uint64_t* bytes) {
  uint64_t n = 1;
  bool zero = false;
  for (int64_t d : t.shape) zero = zero || d == 0;
  if (!zero) {
    for (int64_t d : t.shape)
      if (mul_overflows(n, static_cast<uint64_t>(d), &n)) return false;
  } else {
    n = 0;
  }
  *numel = n;
  return !mul_overflows(n, dtype_size(t.dtype), bytes);
}

// Parses one header entry into t (t.name set); errors name `where` ("FILE: tensor 'x'").
void parse_entry(const json& e, const std::string& where, uint64_t data_size, TensorInfo* t) {
  REMAT_REQUIRE(e.is_object(), where + ": its entry is a JSON " + type_of(e) + ", not an object");
  const auto dt = e.find("dtype");
  REMAT_REQUIRE(dt != e.end(), where + ": no \"dtype\"");
  REMAT_REQUIRE(dt->is_string(),
                where + ": \"dtype\" is a JSON " + type_of(*dt) + ", not a string");
  const std::string& dts = dt->get_ref<const std::string&>();
  REMAT_REQUIRE(parse_dtype(dts, &t->dtype),
                where + ": unknown dtype '" + dts + "' (known: " + known_dtypes() + ")");

  const auto sh = e.find("shape");
  REMAT_REQUIRE(sh != e.end(), where + ": no \"shape\"");
  REMAT_REQUIRE(sh->is_array(), where + ": \"shape\" is a JSON " + type_of(*sh) + ", not an array");
  for (const json& d : *sh) {
    uint64_t v;
    REMAT_REQUIRE(get_u64(d, &v) && v <= static_cast<uint64_t>(INT64_MAX),
                  where + ": \"shape\" holds " + shown(d) + ", not a non-negative integer");
    t->shape.push_back(static_cast<int64_t>(v));
  }

  const auto off = e.find("data_offsets");
  REMAT_REQUIRE(off != e.end(), where + ": no \"data_offsets\"");
  REMAT_REQUIRE(off->is_array() && off->size() == 2 && get_u64((*off)[0], &t->begin) &&
                    get_u64((*off)[1], &t->end),
                where + ": \"data_offsets\" " + shown(*off) +
                    " is not [begin, end] of two non-negative integers");
  REMAT_REQUIRE(t->begin <= t->end,
                where + ": \"data_offsets\" " + off->dump() + " end before they begin");
  REMAT_REQUIRE(t->end <= data_size, where + ": \"data_offsets\" " + off->dump() +
                                         " end past the data, which holds " +
                                         std::to_string(data_size) + " bytes");
  uint64_t bytes = 0;
  REMAT_REQUIRE(tensor_bytes(*t, &t->numel, &bytes),
                where + ": shape " + shape_string(t->shape) + " of " + dts + " overflows");
  REMAT_REQUIRE(bytes == t->end - t->begin, where + ": \"data_offsets\" " + off->dump() + " hold " +
                                                std::to_string(t->end - t->begin) +
                                                " bytes but shape " + shape_string(t->shape) +
                                                " of " + dts + " needs " + std::to_string(bytes));
}

void parse_metadata(const json& m, const std::string& path,
                    std::map<std::string, std::string>* out) {
  if (m.is_null()) return;
  REMAT_REQUIRE(m.is_object(),
                path + ": \"__metadata__\" is a JSON " + type_of(m) + ", not an object of strings");
  for (const auto& [k, v] : m.items()) {
    REMAT_REQUIRE(v.is_string(), path + ": \"__metadata__\" value of '" + k + "' is a JSON " +
                                     type_of(v) + ", not a string");
    (*out)[k] = v.get<std::string>();
  }
}

std::string dir_of(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_file(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_dir(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

uint64_t numel_of(const std::vector<int64_t>& shape) {
  uint64_t n = 1;
  for (int64_t d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

}  // namespace

const char* dtype_name(TensorDType t) {
  for (const DTypeName& d : kDTypes)
    if (d.t == t) return d.name;
  return "?";
}

size_t dtype_size(TensorDType t) {
  for (const DTypeName& d : kDTypes)
    if (d.t == t) return d.size;
  return 0;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string o = "[";
  for (size_t i = 0; i < shape.size(); i++) o += (i ? ", " : "") + std::to_string(shape[i]);
  return o + "]";
}

// ---------------------------------------------------------------- SafetensorsFile

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  FileReader r(path);
  file_size_ = r.size();
  REMAT_REQUIRE(file_size_ >= 8, path + ": not a safetensors file: " + std::to_string(file_size_) +
                                     " bytes, shorter than the 8-byte header length");
  uint8_t len_bytes[8];
  r.read(len_bytes, 8, "the header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; i--) n = (n << 8) | len_bytes[i];
  REMAT_REQUIRE(n <= file_size_ - 8, path + ": the header length " + std::to_string(n) +
                                         " is longer than the " + std::to_string(file_size_ - 8) +
                                         " bytes that follow it");
  REMAT_REQUIRE(n <= kMaxHeaderBytes, path + ": the header length " + std::to_string(n) +
                                          " is above the format's limit of 100 MB");
  REMAT_REQUIRE(n >= 2, path + ": the header length " + std::to_string(n) +
                            " is too short for a JSON object");
  std::string text(static_cast<size_t>(n), '\0');
  r.read(&text[0], text.size(), "the header");
  data_start_ = 8 + n;
  const uint64_t data_size = file_size_ - data_start_;

  REMAT_REQUIRE(text[0] == '{', path + ": the header does not begin with '{'");
  const json h = parse_strict(text, path + ": the header");
  REMAT_REQUIRE(h.is_object(), path + ": the header is a JSON " + type_of(h) + ", not an object");

  for (const auto& [name, e] : h.items()) {
    if (name == "__metadata__") {
      parse_metadata(e, path, &metadata_);
      continue;
    }
    TensorInfo t;
    t.name = name;
    parse_entry(e, path + ": tensor '" + name + "'", data_size, &t);
    tensors_.push_back(std::move(t));
  }

  // The byte ranges must tile the data buffer: no overlaps, no holes, nothing after.
  std::stable_sort(tensors_.begin(), tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t at = 0;
  const TensorInfo* prev = nullptr;
  for (const TensorInfo& t : tensors_) {
    REMAT_REQUIRE(t.begin >= at, path + ": tensor '" + t.name + "' (bytes " +
                                     std::to_string(t.begin) + " to " + std::to_string(t.end) +
                                     ") overlaps tensor '" + (prev ? prev->name : "") +
                                     "' (bytes " + std::to_string(prev ? prev->begin : 0) + " to " +
                                     std::to_string(at) + ")");
    REMAT_REQUIRE(t.begin == at, path + ": " + std::to_string(t.begin - at) +
                                     " bytes before tensor '" + t.name + "' (at offset " +
                                     std::to_string(at) + ") belong to no tensor");
    at = t.end;
    prev = &t;
  }
  REMAT_REQUIRE(at == data_size, path + ": " + std::to_string(data_size - at) +
                                     " bytes after the last tensor (at offset " +
                                     std::to_string(at) + " of the data) belong to no tensor");
  for (size_t i = 0; i < tensors_.size(); i++) by_name_[tensors_[i].name] = i;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  const auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& SafetensorsFile::at(const std::string& name) const {
  const TensorInfo* t = find(name);
  REMAT_REQUIRE(t, path_ + ": no tensor '" + name + "' (" + some_names(by_name_, name) + ")");
  return *t;
}

void SafetensorsFile::read_range(uint64_t offset, void* dst, size_t n,
                                 const std::string& what) const {
  if (n == 0) return;
  FILE* f = std::fopen(path_.c_str(), "rb");
  REMAT_REQUIRE(f, path_ + ": cannot open to read " + what + ": " + std::strerror(errno));
  struct stat st;
  const bool same_size =
      ::fstat(fileno(f), &st) == 0 && static_cast<uint64_t>(st.st_size) == file_size_;
  const bool ok = same_size && ::fseeko(f, static_cast<off_t>(offset), SEEK_SET) == 0 &&
                  std::fread(dst, 1, n, f) == n;
  const int err = errno;
  std::fclose(f);
  REMAT_REQUIRE(same_size,
                path_ + ": changed size since its header was read (reading " + what + ")");
  REMAT_REQUIRE(ok, path_ + ": cannot read " + what + " (" + std::to_string(n) +
                        " bytes at offset " + std::to_string(offset) + "): " + std::strerror(err));
}

std::vector<uint8_t> SafetensorsFile::read_bytes(const std::string& name) const {
  const TensorInfo& t = at(name);
  std::vector<uint8_t> out(static_cast<size_t>(t.end - t.begin));  // within the file: checked
  read_range(data_start_ + t.begin, out.data(), out.size(), "tensor '" + name + "'");
  return out;
}

std::vector<float> SafetensorsFile::read_f32(const std::string& name) const {
  const TensorInfo& t = at(name);
  const TensorDType d = t.dtype;
  REMAT_REQUIRE(d == TensorDType::kF32 || d == TensorDType::kBF16 || d == TensorDType::kF16 ||
                    d == TensorDType::kF64,
                path_ + ": tensor '" + name + "' is " + dtype_name(d) +
                    ", which does not read as fp32 (F32, BF16, F16 and F64 do)");
  std::vector<float> out(static_cast<size_t>(t.numel));  // numel * size <= file size: checked
  read_f32(name, out.data(), out.size());
  return out;
}

void SafetensorsFile::read_f32(const std::string& name, float* dst, size_t n) const {
  const TensorInfo& t = at(name);
  const std::string what = "tensor '" + name + "'";
  REMAT_REQUIRE(n == t.numel, path_ + ": " + what + " has " + std::to_string(t.numel) +
                                  " elements (shape " + shape_string(t.shape) + "), not the " +
                                  std::to_string(n) + " asked for");
  const uint64_t base = data_start_ + t.begin;
  switch (t.dtype) {
    case TensorDType::kF32:
      read_range(base, dst, n * 4, what);
      return;
    case TensorDType::kBF16:
    case TensorDType::kF16:
    case TensorDType::kF64: {
      const size_t esize = dtype_size(t.dtype);
      constexpr size_t kChunk = 1 << 16;  // elements per read
      std::vector<uint8_t> buf(std::min(n, kChunk) * esize);
      for (size_t i = 0; i < n; i += kChunk) {
        const size_t k = std::min(kChunk, n - i);
        read_range(base + i * esize, buf.data(), k * esize, what);
        for (size_t j = 0; j < k; j++) {
          const uint8_t* p = buf.data() + j * esize;
          if (t.dtype == TensorDType::kF64) {
            double v;
            std::memcpy(&v, p, 8);
            dst[i + j] = static_cast<float>(v);
          } else {
            uint16_t h;
            std::memcpy(&h, p, 2);
            dst[i + j] = t.dtype == TensorDType::kBF16 ? bf16_to_float(h) : f16_to_float(h);
          }
        }
      }
      return;
    }
    default:
      throw Error(path_ + ": " + what + " is " + dtype_name(t.dtype) +
                  ", which does not read as fp32 (F32, BF16, F16 and F64 do)");
  }
}

// ---------------------------------------------------------------- SafetensorsCheckpoint

SafetensorsCheckpoint::SafetensorsCheckpoint(const std::string& path) {
  std::string index;
  if (is_dir(path)) {
    const std::string single = path + "/" + kSingleName;
    const std::string idx = path + "/" + kIndexName;
    if (is_file(single)) {
      path_ = single;
    } else {
      REMAT_REQUIRE(is_file(idx), path + ": a checkpoint directory holds " + kSingleName + " or " +
                                      kIndexName + ", and this one holds neither");
      index = idx;
    }
  } else if (ends_with(path, ".index.json")) {
    index = path;
  } else {
    path_ = path;
  }
  if (index.empty()) {
    files_.push_back(std::make_unique<SafetensorsFile>(path_));
    for (const TensorInfo& t : files_[0]->tensors()) where_[t.name] = 0;
    return;
  }

  path_ = index;
  const std::vector<uint8_t> bytes = read_file_bytes(index);
  const json j = parse_strict(std::string(bytes.begin(), bytes.end()), index);
  REMAT_REQUIRE(j.is_object(), index + ": is a JSON " + type_of(j) + ", not an object");
  const auto wm = j.find("weight_map");
  REMAT_REQUIRE(wm != j.end(), index + ": no \"weight_map\"");
  REMAT_REQUIRE(wm->is_object(),
                index + ": \"weight_map\" is a JSON " + type_of(*wm) + ", not an object");
  const std::string dir = dir_of(index);
  std::map<std::string, size_t> shard_index;  // shard file name -> index in files_
  for (const auto& [name, v] : wm->items()) {
    REMAT_REQUIRE(v.is_string(), index + ": \"weight_map\" entry of tensor '" + name +
                                     "' is a JSON " + type_of(v) + ", not a file name");
    const std::string& shard = v.get_ref<const std::string&>();
    REMAT_REQUIRE(
        !shard.empty() && shard.find('/') == std::string::npos && shard != "." && shard != "..",
        index + ": tensor '" + name + "' is mapped to '" + shard +
            "', which is not a file name in the index's directory");
    auto it = shard_index.find(shard);
    if (it == shard_index.end()) {
      files_.push_back(std::make_unique<SafetensorsFile>(dir + "/" + shard));
      it = shard_index.emplace(shard, files_.size() - 1).first;
    }
    const SafetensorsFile& f = *files_[it->second];
    if (!f.find(name)) {
      std::map<std::string, int> there;
      for (const TensorInfo& t : f.tensors()) there[t.name] = 0;
      throw Error(index + ": tensor '" + name + "' is mapped to " + shard +
                  ", which does not hold it (" + some_names(there, name) + ")");
    }
    where_[name] = it->second;
  }
}

size_t SafetensorsCheckpoint::file_index(const std::string& name) const {
  const auto it = where_.find(name);
  REMAT_REQUIRE(it != where_.end(),
                path_ + ": no tensor '" + name + "' (" + some_names(where_, name) + ")");
  return it->second;
}

std::vector<std::string> SafetensorsCheckpoint::names() const {
  std::vector<std::string> out;
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

const TensorInfo& SafetensorsCheckpoint::at(const std::string& name) const {
  return *files_[file_index(name)]->find(name);
}

const SafetensorsFile& SafetensorsCheckpoint::file_of(const std::string& name) const {
  return *files_[file_index(name)];
}

std::vector<float> SafetensorsCheckpoint::read_f32(const std::string& name) const {
  return file_of(name).read_f32(name);
}

void SafetensorsCheckpoint::read_f32(const std::string& name, float* dst, size_t n) const {
  file_of(name).read_f32(name, dst, n);
}

// ---------------------------------------------------------------- writers

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<const TensorToWrite*> order;
  std::set<std::string> names;
  for (const TensorToWrite& t : tensors) {
    REMAT_CHECK(t.dtype == TensorDType::kF32 || t.dtype == TensorDType::kBF16,
                path + ": tensor '" + t.name + "': only F32 and BF16 are written, not " +
                    dtype_name(t.dtype));
    REMAT_CHECK(t.name != "__metadata__", path + ": no tensor may be called __metadata__");
    REMAT_CHECK(names.insert(t.name).second, path + ": tensor '" + t.name + "' given twice");
    for (int64_t d : t.shape)
      REMAT_CHECK(d >= 0, path + ": tensor '" + t.name + "' has shape " + shape_string(t.shape));
    REMAT_CHECK(t.data || numel_of(t.shape) == 0, path + ": tensor '" + t.name + "' has no data");
    order.push_back(&t);
  }
  // The Hugging Face writer's order: larger elements first (keeps every tensor aligned to its
  // element size), then by name.
  std::sort(order.begin(), order.end(), [](const TensorToWrite* a, const TensorToWrite* b) {
    const size_t sa = dtype_size(a->dtype), sb = dtype_size(b->dtype);
    return sa != sb ? sa > sb : a->name < b->name;
  });

  ordered_json h = ordered_json::object();
  if (!metadata.empty()) {
    ordered_json m = ordered_json::object();
    for (const auto& [k, v] : metadata) m[k] = v;
    h["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (const TensorToWrite* t : order) {
    const uint64_t bytes = numel_of(t->shape) * dtype_size(t->dtype);
    h[t->name] = {{"dtype", dtype_name(t->dtype)},
                  {"shape", t->shape},
                  {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header = h.dump(-1, ' ', false, ordered_json::error_handler_t::strict);
  header.append((8 - header.size() % 8) % 8, ' ');

  write_file_atomic(path, [&](FILE* f) {
    uint8_t len[8];
    for (int i = 0; i < 8; i++) len[i] = static_cast<uint8_t>(header.size() >> (8 * i));
    write_all(f, len, 8, path);
    write_all(f, header.data(), header.size(), path);
    std::vector<uint16_t> buf;
    for (const TensorToWrite* t : order) {
      const size_t n = static_cast<size_t>(numel_of(t->shape));
      if (t->dtype == TensorDType::kF32) {
        write_all(f, t->data, n * 4, path);
        continue;
      }
      constexpr size_t kChunk = 1 << 16;
      buf.resize(std::min(n, kChunk));
      for (size_t i = 0; i < n; i += kChunk) {
        const size_t k = std::min(kChunk, n - i);
        for (size_t j = 0; j < k; j++) buf[j] = float_to_bf16(t->data[i + j]);
        write_all(f, buf.data(), k * 2, path);
      }
    }
  });
}

std::vector<std::string> write_safetensors_checkpoint(
    const std::string& dir, const std::vector<TensorToWrite>& tensors, uint64_t max_shard_bytes,
    const std::map<std::string, std::string>& metadata) {
  REMAT_REQUIRE(is_dir(dir), dir + ": not a directory (the checkpoint directory must exist)");
  std::map<std::string, std::string> meta = metadata;
  if (!meta.count("format")) meta["format"] = "pt";

  // Shards in the order given, as transformers' shard_checkpoint does.
  std::vector<std::vector<TensorToWrite>> shards(1);
  uint64_t in_shard = 0, total = 0;
  for (const TensorToWrite& t : tensors) {
    const uint64_t bytes = numel_of(t.shape) * dtype_size(t.dtype);
    if (!shards.back().empty() && in_shard + bytes > max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(t);
    in_shard += bytes;
    total += bytes;
  }
  std::vector<std::string> written;
  if (shards.size() == 1) {
    written.push_back(dir + "/" + kSingleName);
    write_safetensors(written[0], tensors, meta);
    return written;
  }
  const size_t n = shards.size();
  REMAT_CHECK(n <= 99999, dir + ": " + std::to_string(n) + " shards");
  ordered_json weight_map = ordered_json::object();
  std::map<std::string, std::string> map_sorted;  // transformers writes it sorted by name
  for (size_t s = 0; s < n; s++) {
    char name[64];
    std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, n);
    written.push_back(dir + "/" + name);
    write_safetensors(written.back(), shards[s], meta);
    for (const TensorToWrite& t : shards[s]) map_sorted[t.name] = name;
  }
  for (const auto& [k, v] : map_sorted) weight_map[k] = v;
  ordered_json idx = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  const std::string text = idx.dump(2) + "\n";
  written.push_back(dir + "/" + kIndexName);
  write_file_atomic(written.back(), text.data(), text.size());
  return written;
}

}  // namespace remat
