// The CUDA implementation of remat::Stream (runtime/stream.h).
//
// - launch() runs fn on the calling host thread at once; fn enqueues kernels onto native().
//   The call is wrapped in an NVTX range named by the label.
// - record() records a cudaEvent_t (from a per-stream pool) after everything enqueued so
//   far and returns a new, increasing seq mapped to it. Events whose work has completed go
//   back to the pool; a seq at or below the completed watermark is complete by definition.
// - wait(e) enqueues cudaStreamWaitEvent on the event mapped to e (or, for a seq never
//   recorded exactly, the first event recorded after it). Events of non-CUDA streams are
//   waited for on the host.
// - The stream is created with cudaStreamNonBlocking (no implicit legacy-stream sync) and
//   named for Nsight Systems (nvtxNameCudaStreamA).
// - With a trace sink attached, each launch is bracketed by timing events; records reach
//   the sink at synchronize() (start/end in ns on the host steady clock, anchored when the
//   sink was attached).
// All methods may be called from any host thread (one mutex per stream).
#pragma once
#include <memory>
#include <string>

#include "runtime/stream.h"

namespace remat {

// A CUDA stream on the current device. priority: cudaStreamCreateWithPriority's value
// (0 = default; lower numbers are higher priority).
std::unique_ptr<Stream> make_cuda_stream(const std::string& name, int id, int priority = 0);

}  // namespace remat
