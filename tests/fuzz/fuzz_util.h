// Helpers shared by the libFuzzer targets in tests/fuzz/.
//
// The readers under test take a path, so each input is handed to them as a file: an anonymous
// in-memory file (memfd) named by its /proc/self/fd path, which costs no disk I/O. Writers
// (round-trip checks) need a real directory because they write a temporary file beside the
// target and rename it; ScratchDir gives one on tmpfs when /dev/shm exists.
#pragma once
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace remat_fuzz {

// Reports a broken invariant as a crash, which libFuzzer records as a finding.
#define FUZZ_ASSERT(cond)                                                                   \
  do {                                                                                      \
    if (!(cond)) {                                                                          \
      std::fprintf(stderr, "FUZZ_ASSERT failed: %s at %s:%d\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                         \
    }                                                                                       \
  } while (0)

// A memfd holding exactly the given bytes; path() opens it as a regular file.
class MemFile {
 public:
  MemFile(const uint8_t* data, size_t n) {
    fd_ = ::memfd_create("remat-fuzz", MFD_CLOEXEC);
    if (fd_ < 0) {
      std::perror("memfd_create");
      std::abort();
    }
    for (size_t done = 0; done < n;) {
      const ssize_t w = ::write(fd_, data + done, n - done);
      if (w <= 0) {
        std::perror("write to memfd");
        std::abort();
      }
      done += static_cast<size_t>(w);
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

// A per-process directory for round-trip writes, created on first use (on tmpfs if possible)
// and removed at exit; callers remove the files they write in it.
inline const char* scratch_dir() {
  static char dir[128];
  if (dir[0] == 0) {
    const char* base = ::access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    std::snprintf(dir, sizeof dir, "%s/remat-fuzz-%ld", base, static_cast<long>(::getpid()));
    ::mkdir(dir, 0700);
    std::atexit([] { ::rmdir(dir); });
  }
  return dir;
}

// The byte at index i, or 0 past the end.
inline uint32_t byte_at(const uint8_t* data, size_t n, size_t i) {
  return i < n ? data[i] : 0;
}

}  // namespace remat_fuzz
