// NVTX ranges and thread names for Nsight Systems.
//
// With NVTX3 available (the header-only library under the CUDA toolkit's include directory)
// the calls go to it; they cost a function-pointer check and do nothing unless a profiler
// (nsys, ncu) has injected itself. Without NVTX3 every call here compiles to nothing.
//
// Names: an NVTX message is copied by the profiler when the range opens, so `name` only has
// to live for the constructor call. Ranges nest per thread (push/pop): open and close a range
// on the same thread, which the RAII helper guarantees.
#pragma once

#if defined(__has_include)
#if __has_include(<nvtx3/nvToolsExt.h>)
#define REMAT_HAVE_NVTX3 1
#endif
#endif

namespace remat {

#ifdef REMAT_HAVE_NVTX3
namespace detail {
void nvtx_push(const char* name);
void nvtx_push_payload(const char* name, int payload);  // payload: shown beside the name
void nvtx_pop();
}  // namespace detail

// Names the calling OS thread in the profiler's timeline (nvtxNameOsThreadA).
void nvtx_name_thread(const char* name);
#else
inline void nvtx_name_thread(const char*) {}
#endif

// One NVTX push/pop range on the calling thread, from construction to destruction.
// NvtxRange("bwd.attention", l) keeps the name "bwd.attention" (so `nsys stats` groups every
// block under one name) and carries l as the range's int32 payload; a negative index means
// "no index" and carries none.
class NvtxRange {
 public:
#ifdef REMAT_HAVE_NVTX3
  explicit NvtxRange(const char* name) {
    detail::nvtx_push(name);
  }
  NvtxRange(const char* name, int index) {
    if (index >= 0)
      detail::nvtx_push_payload(name, index);
    else
      detail::nvtx_push(name);
  }
  ~NvtxRange() {
    detail::nvtx_pop();
  }
#else
  explicit NvtxRange(const char*) {}
  NvtxRange(const char*, int) {}
#endif
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

}  // namespace remat
