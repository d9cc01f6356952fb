// NVTX3 calls behind runtime/nvtx.h. This is the only file that includes the NVTX3 headers,
// so the library's global state has one definition site.
#include "runtime/nvtx.h"

#ifdef REMAT_HAVE_NVTX3
#include <nvtx3/nvToolsExt.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace remat {
namespace {

// NVTX3 initializes itself on first use from whichever thread calls first, publishing its
// function pointers with __sync fences that ThreadSanitizer does not model. Initializing it
// once behind a function-local static gives every caller a happens-before edge to the
// initialization, so later plain reads of those pointers are race-free.
void ensure_initialized() {
  static const bool initialized = [] {
    nvtxInitialize(nullptr);
    return true;
  }();
  (void)initialized;
}

}  // namespace

namespace detail {

void nvtx_push(const char* name) {
  ensure_initialized();
  nvtxRangePushA(name);
}

void nvtx_push_payload(const char* name, int payload) {
  ensure_initialized();
  nvtxEventAttributes_t a{};
  a.version = NVTX_VERSION;
  a.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
  a.messageType = NVTX_MESSAGE_TYPE_ASCII;
  a.message.ascii = name;
  a.payloadType = NVTX_PAYLOAD_TYPE_INT32;
  a.payload.iValue = payload;
  nvtxRangePushEx(&a);
}

void nvtx_pop() {
  ensure_initialized();
  nvtxRangePop();
}

}  // namespace detail

void nvtx_name_thread(const char* name) {
  ensure_initialized();
  nvtxNameOsThreadA(static_cast<uint32_t>(::syscall(SYS_gettid)), name);
}

}  // namespace remat
#endif  // REMAT_HAVE_NVTX3
