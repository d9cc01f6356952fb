// Whole-file writes that are atomic (temporary file, fsync, rename, fsync of the directory)
// and bounds-checked reads. Every error is a remat::Error naming the file path.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace remat {

// Replaces `path` with the bytes `write` puts into the FILE* it is handed. The bytes go to
// `path.tmp.<pid>` in the same directory, which is flushed, fsynced, closed and renamed over
// `path`; then the directory is fsynced. On any failure (open, short write, a throw from
// `write`, fsync, close, rename) the temporary file is removed, the previous file at `path`
// is left untouched, and an Error naming the path (and strerror where the OS said why) is
// thrown. `write` should use write_all(), which throws on a short write.
void write_file_atomic(const std::string& path, const std::function<void(FILE*)>& write);
// The same for a byte buffer.
void write_file_atomic(const std::string& path, const void* data, size_t n);

// fwrite that throws an Error naming `path` unless all n bytes were written.
void write_all(FILE* f, const void* data, size_t n, const std::string& path);

// The whole file as bytes; Error naming the path if it is missing or unreadable.
std::vector<uint8_t> read_file_bytes(const std::string& path);

// A sequential reader that knows the file size, so that headers can be checked against it
// before anything is allocated. Reads never go past the end: a short file is an Error naming
// the path and what was being read.
class FileReader {
 public:
  explicit FileReader(const std::string& path);  // Error if missing or unreadable
  ~FileReader();
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;

  // Reads exactly n bytes into dst; `what` names the field for the error message.
  void read(void* dst, size_t n, const char* what);
  uint64_t size() const { return size_; }
  uint64_t offset() const { return offset_; }
  uint64_t remaining() const { return size_ - offset_; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  FILE* f_ = nullptr;
  uint64_t size_ = 0;
  uint64_t offset_ = 0;
};

}  // namespace remat
