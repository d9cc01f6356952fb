// CUPTI activity tracing for CudaStream (runtime/cuda/cuda_stream.cpp): the GPU start and end of
// every kernel, memcpy and memset a traced op enqueued, on the host steady clock.
//
// CUPTI's activity API is process-wide, so this is one shared session for every CudaStream that has
// a trace sink attached:
// - cupti_trace_attach() (from set_trace_sink) sets CUPTI up once per process. It subscribes first,
//   so a tool that owns CUPTI (Nsight Systems, Nsight Compute, compute-sanitizer) makes it fail,
//   and the stream then times its ops with cudaEvents. While at least one stream is attached the
//   kernel, memcpy, memset, external-correlation, runtime-API and driver-API activity kinds are
//   enabled (the API kinds only because CUPTI emits external-correlation records with them); the
//   CUPTI-to-steady-clock offset is measured when the first stream attaches.
// - CuptiOpScope, around the op's fn() in launch(), tags the calling thread's CUDA calls with an
//   external correlation id (CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM0) naming the op, so each
//   activity record maps to the op's label and the caller's tag for the op.
// - cupti_trace_collect() flushes CUPTI's completed buffers and hands a stream the records whose
//   CUPTI stream id is its own (even when another stream's op enqueued the work).
// Records may come late: CUPTI holds a buffer back while any record in it is incomplete (a kernel
// still running on another stream). An op stays matchable for kMaxLateCollects (cupti_trace.cpp)
// collects of its stream after its stream was synchronized, then is forgotten; an op that enqueued
// no GPU work never gets a record.
// One device: CUPTI stream ids are unique within a context only.
// REMAT_CUPTI=0 in the environment makes cupti_trace_attach() refuse (cudaEvent timing).
// Threads: every function may be called from any host thread.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

namespace remat {

// One piece of GPU work of a traced op, as CUPTI timed it.
struct CuptiRecord {
  const char* label;        // the op's label from launch() (static storage)
  int tag;                  // the caller's tag of the op (CuptiOpScope), opaque here
  int64_t start_ns;         // host steady clock (steady_now_ns())
  int64_t end_ns;           // > start_ns
  uint32_t correlation_id;  // CUPTI's id of the API call that enqueued it
  const char* name;         // kernel name (CUPTI's storage), or "memcpy" / "memset"
};

// Starts CUPTI tracing of `stream`; on true, *cupti_stream is CUPTI's id of it (the key of the
// functions below). False when CUPTI cannot be used: the caller times with cudaEvents. Either
// choice is reported once per process on stderr. Never throws.
bool cupti_trace_attach(cudaStream_t stream, uint32_t* cupti_stream);

// Ends tracing of a stream attached above; its uncollected records are discarded. The last
// detach disables CUPTI's activity kinds. Never throws (errors go to stderr).
void cupti_trace_detach(uint32_t cupti_stream) noexcept;

// Flushes CUPTI's completed buffers and appends the stream's records that have arrived, in no
// particular order, to *out. Call after the stream was synchronized: its ops launched so far then
// count as complete (see "late" above). Throws remat::Error when CUPTI fails.
void cupti_trace_collect(uint32_t cupti_stream, std::vector<CuptiRecord>* out);

// The number of streams attached (0: no CUPTI session). For tests.
int cupti_trace_attached_streams();

// Tags the calling thread's CUDA calls, for the object's lifetime, as those of one op of an
// attached stream. `label` has static storage.
class CuptiOpScope {
 public:
  CuptiOpScope(uint32_t cupti_stream, const char* label, int tag);
  ~CuptiOpScope();
  CuptiOpScope(const CuptiOpScope&) = delete;
  CuptiOpScope& operator=(const CuptiOpScope&) = delete;
};

}  // namespace remat
