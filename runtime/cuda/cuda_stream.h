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
// - synchronize() waits for the work enqueued before it began and retires the events recorded
//   before it began; one another thread records meanwhile stays pending (done() asks CUDA).
// - Destroying the stream waits for its work and frees its cuBLASLt workspace
//   (kernels/matmul.h), if a GEMM gave it one.
// - The stream is created with cudaStreamNonBlocking (no implicit legacy-stream sync) and
//   named for Nsight Systems (nvtxNameCudaStreamA).
// - Tracing (a sink attached): records reach the sink at synchronize(), start/end in ns on the
//   host steady clock, label and block those of the launch() that enqueued the work.
//   * CUPTI (runtime/cuda/cupti_trace.h), the default: one record per kernel, memcpy or memset
//     an op enqueued on this stream, timed on the GPU by CUPTI activity records and matched to
//     the op by an external correlation id pushed around fn(). An op that enqueued no GPU work
//     has no record. A record CUPTI delivers late reaches the sink at a later synchronize(), or
//     at detach (set_trace_sink(nullptr) hands it to the old sink).
//   * cudaEvents, where CUPTI cannot be used (another tool such as Nsight Systems owns it, or
//     REMAT_CUPTI=0): each launch is bracketed by two timing events, one record per op,
//     anchored to the host clock by an event synchronized when the sink was attached.
//   Which of the two is used is said once per process on stderr.
//   An ItemTraceSink (runtime/trace_sink.h) gets TraceRecords instead: each op's record(s)
//   with seq = its 1-based position in this stream's launch order (every launch() and every
//   wait on another CUDA stream's event counts, traced or not; all kernel records of one op
//   share it) and launch_ns = the host clock in launch(); and each wait on another CUDA
//   stream's event as an unresolved "wait" record (start = end = 0) with its own seq,
//   launch_ns = the host clock in wait(), waited_stream and waited_seq = the waited event's
//   position in the waited stream's launch order (0 when that stream has no ItemTraceSink or
//   the event was already known complete). The Tracer resolves its interval
//   (profiling/tracer.h). With CUPTI, the op is opened with a process-unique key in place of
//   its block (CuptiOpScope), mapped back to block, seq and launch time when records arrive.
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
