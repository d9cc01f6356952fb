#include "io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "base/error.h"

namespace remat {
namespace {

std::string os_error() {
  return std::strerror(errno);
}

std::string parent_dir(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// Makes a rename inside `dir` durable. Filesystems that cannot fsync a directory say EINVAL;
// that is not an error of ours.
void fsync_dir(const std::string& dir, const std::string& path) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0)
    throw Error(path + ": written, but cannot open its directory to fsync: " + os_error());
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0 && err != EINVAL && err != EROFS)
    throw Error(path + ": written, but fsync of its directory failed: " + std::strerror(err));
}

}  // namespace

void write_all(FILE* f, const void* data, size_t n, const std::string& path) {
  if (n == 0) return;
  const size_t wrote = std::fwrite(data, 1, n, f);
  if (wrote != n || std::ferror(f))
    throw Error(path + ": short write (" + std::to_string(wrote) + " of " + std::to_string(n) +
                " bytes): " + os_error());
}

void write_file_atomic(const std::string& path, const std::function<void(FILE*)>& write) {
  const std::string tmp = path + ".tmp." + std::to_string(static_cast<long>(::getpid()));
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error(path + ": cannot create temporary file " + tmp + ": " + os_error());
  try {
    write(f);
    if (std::fflush(f) != 0 || std::ferror(f))
      throw Error(path + ": write to " + tmp + " failed: " + os_error());
    if (::fsync(fileno(f)) != 0) throw Error(path + ": fsync of " + tmp + " failed: " + os_error());
  } catch (...) {
    std::fclose(f);
    std::remove(tmp.c_str());
    throw;
  }
  if (std::fclose(f) != 0) {
    const std::string why = os_error();
    std::remove(tmp.c_str());
    throw Error(path + ": closing " + tmp + " failed: " + why);
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const std::string why = os_error();
    std::remove(tmp.c_str());
    throw Error(path + ": cannot rename " + tmp + " over it: " + why);
  }
  fsync_dir(parent_dir(path), path);
}

void write_file_atomic(const std::string& path, const void* data, size_t n) {
  write_file_atomic(path, [&](FILE* f) { write_all(f, data, n, path); });
}

FileReader::FileReader(const std::string& path) : path_(path) {
  f_ = std::fopen(path.c_str(), "rb");
  if (!f_) throw Error(path + ": cannot open: " + os_error());
  struct stat st;
  if (::fstat(fileno(f_), &st) != 0) {
    const std::string why = os_error();
    std::fclose(f_);
    throw Error(path + ": cannot stat: " + why);
  }
  if (!S_ISREG(st.st_mode)) {
    std::fclose(f_);
    throw Error(path + ": not a regular file");
  }
  size_ = static_cast<uint64_t>(st.st_size);
}

FileReader::~FileReader() {
  if (f_) std::fclose(f_);
}

void FileReader::read(void* dst, size_t n, const char* what) {
  if (n > remaining())
    throw Error(path_ + ": truncated: reading " + what + " needs " + std::to_string(n) +
                " bytes at offset " + std::to_string(offset_) + " but the file holds " +
                std::to_string(size_) + " bytes");
  if (n == 0) return;
  const size_t got = std::fread(dst, 1, n, f_);
  if (got != n)
    throw Error(path_ + ": read of " + what + " failed at offset " + std::to_string(offset_) +
                " (" + std::to_string(got) + " of " + std::to_string(n) + " bytes)" +
                (std::ferror(f_) ? ": " + os_error() : std::string()));
  offset_ += n;
}

std::vector<uint8_t> read_file_bytes(const std::string& path) {
  FileReader r(path);
  if (r.size() > SIZE_MAX / 2) throw Error(path + ": file too large to read into memory");
  std::vector<uint8_t> bytes(static_cast<size_t>(r.size()));
  r.read(bytes.data(), bytes.size(), "the file");
  return bytes;
}

}  // namespace remat
