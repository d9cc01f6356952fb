// The process-wide CUPTI activity session behind CudaStream's tracing (contract in
// runtime/cuda/cupti_trace.h).
//
// Locks: control_mu serializes CUPTI control calls (setup, enable/disable, flush); data_mu guards
// the tables and is never held across a CUPTI call, because CUPTI's buffer callbacks (on its own
// thread or inside cuptiActivityFlushAll) take it.
#include "runtime/cuda/cupti_trace.h"

#include <cupti.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <exception>
#include <limits>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>

#include "kernels/cuda_common.cuh"
#include "runtime/stream.h"

namespace remat {
namespace {

constexpr size_t kBufferBytes = size_t{8} << 20;  // one activity buffer
constexpr size_t kBufferAlign = 8;                // CUPTI's ACTIVITY_RECORD_ALIGNMENT
// Collects an op stays matchable after its stream's synchronize(), and an unmatched record waits
// for its external-correlation record.
constexpr int kMaxLateCollects = 8;
constexpr CUpti_ExternalCorrelationKind kOpCorrelation = CUPTI_EXTERNAL_CORRELATION_KIND_CUSTOM0;
// Enabled while a stream is attached. The runtime- and driver-API kinds are never read: CUPTI
// writes an external-correlation record only beside an API record (kernels launched through
// cudaLaunchKernel have the runtime call's correlation id, cuBLASLt's may have a driver call's).
constexpr CUpti_ActivityKind kKinds[] = {
    CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL,
    CUPTI_ACTIVITY_KIND_MEMCPY,
    CUPTI_ACTIVITY_KIND_MEMSET,
    CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION,
    CUPTI_ACTIVITY_KIND_RUNTIME,
    CUPTI_ACTIVITY_KIND_DRIVER,
};

const char* result_string(CUptiResult r) {
  const char* s = nullptr;
  cuptiGetResultString(r, &s);
  return s ? s : "unknown CUPTI error";
}

// A GPU activity record as parsed, before it is matched with its op.
struct RawActivity {
  uint32_t stream;           // CUPTI stream id
  uint32_t correlation_id;   // of the API call that enqueued it
  int64_t start_ns, end_ns;  // host steady clock
  const char* name;          // as CuptiRecord::name
  int age;                   // collects it has waited unmatched
};

// A traced op, from CuptiOpScope.
struct Op {
  const char* label;
  int tag;
};

// The session's view of one attached stream.
struct StreamState {
  std::deque<uint64_t> ops;        // ids of its ops still matchable, oldest first
  std::deque<uint64_t> marks;      // newest op id at each of its last collects, oldest first
  std::vector<CuptiRecord> ready;  // matched records not yet collected
  uint64_t newest_op = 0;          // id of its newest op
};

class Session {
 public:
  bool attach(cudaStream_t stream, uint32_t* cupti_stream);
  void detach(uint32_t cupti_stream) noexcept;
  void collect(uint32_t cupti_stream, std::vector<CuptiRecord>* out);
  int attached() const { return attached_.load(); }
  void begin_op(uint32_t cupti_stream, const char* label, int tag);

  // CUPTI's buffer-completed callback: parses the records and matches what it can.
  void parse(uint8_t* buffer, size_t valid_bytes);
  void note_dropped(size_t n);

 private:
  bool setup_locked(std::string* why);
  bool start_locked(std::string* why);
  void stop_locked() noexcept;
  void tell(bool cupti, const std::string& why);
  // Matches a with its op: true when a went to a stream's ready list or can never match.
  bool match_locked(const RawActivity& a);
  void forget_ops_locked(StreamState* s, uint64_t up_to);

  std::mutex control_mu_;
  bool setup_tried_ = false;  // the rest under control_mu_
  bool setup_ok_ = false;
  std::string setup_error_;
  CUpti_SubscriberHandle subscriber_ = nullptr;
  bool told_cupti_ = false, told_events_ = false;
  std::atomic<int> attached_{0};
  std::atomic<int64_t> offset_ns_{0};  // steady_now_ns() - cuptiGetTimestamp() of this session

  std::mutex data_mu_;
  uint64_t next_op_ = 0;                               // the rest under data_mu_
  std::unordered_map<uint64_t, Op> ops_;               // op id -> op, while matchable
  std::unordered_map<uint32_t, uint64_t> links_;       // correlation id -> op id
  std::unordered_map<uint32_t, StreamState> streams_;  // CUPTI stream id -> attached stream
  std::vector<RawActivity> unmatched_;  // records of attached streams, op unknown yet
  bool told_dropped_ = false;
};

// Never destroyed: CUPTI may deliver buffers while the process exits.
Session& session() {
  static Session* s = new Session;
  return *s;
}

void CUPTIAPI on_buffer_requested(uint8_t** buffer, size_t* size, size_t* max_records) {
  *buffer = static_cast<uint8_t*>(std::aligned_alloc(kBufferAlign, kBufferBytes));
  *size = *buffer ? kBufferBytes : 0;  // no buffer: CUPTI drops records and counts them
  *max_records = 0;                    // as many as fit
}

void CUPTIAPI on_buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buffer, size_t,
                                  size_t valid_bytes) {
  try {
    session().parse(buffer, valid_bytes);
  } catch (const std::exception& e) {  // a C callback: nothing may escape
    std::fprintf(stderr, "remat: CUPTI records lost: %s\n", e.what());
  }
  std::free(buffer);
  size_t dropped = 0;
  if (cuptiActivityGetNumDroppedRecords(ctx, stream, &dropped) == CUPTI_SUCCESS && dropped > 0)
    session().note_dropped(dropped);
}

// Subscribed only to claim CUPTI; no callback domain is enabled.
void CUPTIAPI on_callback(void*, CUpti_CallbackDomain, CUpti_CallbackId, const void*) {}

bool Session::attach(cudaStream_t stream, uint32_t* cupti_stream) {
  std::lock_guard<std::mutex> lk(control_mu_);
  const char* env = std::getenv("REMAT_CUPTI");
  if (env != nullptr && std::strcmp(env, "0") == 0) {
    tell(false, "REMAT_CUPTI=0");
    return false;
  }
  std::string why;
  if (!setup_locked(&why)) {
    tell(false, why);
    return false;
  }
  if (attached_.load() == 0 && !start_locked(&why)) {
    tell(false, why);
    return false;
  }
  uint32_t id = 0;
  const CUptiResult r = cuptiGetStreamIdEx(nullptr, stream, 0, &id);
  if (r != CUPTI_SUCCESS) {
    if (attached_.load() == 0) stop_locked();
    tell(false, std::string("cuptiGetStreamIdEx: ") + result_string(r));
    return false;
  }
  {
    std::lock_guard<std::mutex> dl(data_mu_);
    streams_[id] = StreamState{};
  }
  attached_.fetch_add(1);
  tell(true, "");
  *cupti_stream = id;
  return true;
}

void Session::detach(uint32_t cupti_stream) noexcept {
  std::lock_guard<std::mutex> lk(control_mu_);
  {
    std::lock_guard<std::mutex> dl(data_mu_);
    const auto it = streams_.find(cupti_stream);
    if (it == streams_.end()) return;
    forget_ops_locked(&it->second, std::numeric_limits<uint64_t>::max());
    streams_.erase(it);
  }
  if (attached_.fetch_sub(1) == 1) stop_locked();
}

void Session::collect(uint32_t cupti_stream, std::vector<CuptiRecord>* out) {
  {
    std::lock_guard<std::mutex> lk(control_mu_);
    if (attached_.load() == 0) return;
    REMAT_CUPTI_CHECK(cuptiActivityFlushAll(0));  // buffers whose records are all complete
  }
  std::lock_guard<std::mutex> dl(data_mu_);
  size_t kept = 0;
  for (RawActivity& a : unmatched_)
    if (!match_locked(a) && ++a.age <= kMaxLateCollects) unmatched_[kept++] = a;
  unmatched_.resize(kept);
  const auto it = streams_.find(cupti_stream);
  if (it == streams_.end()) return;
  StreamState& s = it->second;
  out->insert(out->end(), s.ready.begin(), s.ready.end());
  s.ready.clear();
  // The stream was synchronized: its ops so far are complete. Forget those that completed
  // kMaxLateCollects collects ago, with their correlation links.
  s.marks.push_back(s.newest_op);
  if (static_cast<int>(s.marks.size()) > kMaxLateCollects) {
    forget_ops_locked(&s, s.marks.front());
    s.marks.pop_front();
  }
}

void Session::begin_op(uint32_t cupti_stream, const char* label, int tag) {
  uint64_t id;
  {
    std::lock_guard<std::mutex> dl(data_mu_);
    const auto it = streams_.find(cupti_stream);
    REMAT_CHECK(it != streams_.end(), "CUPTI trace: op on a stream that is not attached");
    id = ++next_op_;
    ops_.emplace(id, Op{label, tag});
    it->second.ops.push_back(id);
    it->second.newest_op = id;
  }
  REMAT_CUPTI_CHECK(cuptiActivityPushExternalCorrelationId(kOpCorrelation, id));
}

void Session::parse(uint8_t* buffer, size_t valid_bytes) {
  std::vector<RawActivity> activities;
  std::vector<std::pair<uint32_t, uint64_t>> links;  // correlation id -> op id
  const int64_t offset = offset_ns_.load();
  auto add = [&](uint32_t stream, uint32_t correlation, uint64_t start, uint64_t end,
                 const char* name) {
    if (start == 0 || end <= start) return;  // incomplete (a forced flush) or empty
    activities.push_back(RawActivity{stream, correlation, static_cast<int64_t>(start) + offset,
                                     static_cast<int64_t>(end) + offset, name, 0});
  };
  CUpti_Activity* rec = nullptr;
  while (cuptiActivityGetNextRecord(buffer, valid_bytes, &rec) == CUPTI_SUCCESS) {
    switch (rec->kind) {
      case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL: {
        const auto* k = reinterpret_cast<const CUpti_ActivityKernel10*>(rec);
        add(k->streamId, k->correlationId, k->start, k->end, k->name);
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMCPY: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemcpy6*>(rec);
        add(m->streamId, m->correlationId, m->start, m->end, "memcpy");
        break;
      }
      case CUPTI_ACTIVITY_KIND_MEMSET: {
        const auto* m = reinterpret_cast<const CUpti_ActivityMemset4*>(rec);
        add(m->streamId, m->correlationId, m->start, m->end, "memset");
        break;
      }
      case CUPTI_ACTIVITY_KIND_EXTERNAL_CORRELATION: {
        const auto* e = reinterpret_cast<const CUpti_ActivityExternalCorrelation*>(rec);
        if (e->externalKind == kOpCorrelation) links.emplace_back(e->correlationId, e->externalId);
        break;
      }
      default:  // API records: enabled only for the external-correlation records
        break;
    }
  }
  std::lock_guard<std::mutex> dl(data_mu_);
  for (const auto& l : links)
    if (ops_.count(l.second)) links_[l.first] = l.second;
  for (const RawActivity& a : activities)
    if (!match_locked(a)) unmatched_.push_back(a);
}

void Session::note_dropped(size_t n) {
  std::lock_guard<std::mutex> dl(data_mu_);
  if (told_dropped_) return;
  told_dropped_ = true;
  std::fprintf(stderr, "remat: CUPTI dropped %zu activity records: the trace misses some ops\n", n);
}

bool Session::setup_locked(std::string* why) {
  if (!setup_tried_) {
    setup_tried_ = true;
    char owner[CUPTI_OLD_SUBSCRIBER_NAME_MIN_LEN] = {};
    CUpti_SubscriberParams params{};
    params.structSize = CUpti_SubscriberParams_STRUCT_SIZE;
    params.subscriberName = "remat tracer";
    params.oldSubscriberName = owner;
    params.oldSubscriberSize = sizeof owner;
    CUptiResult r = cuptiSubscribe_v2(&subscriber_, on_callback, nullptr, &params);
    if (r != CUPTI_SUCCESS) {
      setup_error_ = std::string("cuptiSubscribe: ") + result_string(r);
      if (owner[0] != '\0') setup_error_ += std::string(" (held by ") + owner + ")";
    } else if ((r = cuptiActivityRegisterCallbacks(on_buffer_requested, on_buffer_completed)) !=
               CUPTI_SUCCESS) {
      setup_error_ = std::string("cuptiActivityRegisterCallbacks: ") + result_string(r);
      cuptiUnsubscribe(subscriber_);
    } else {
      setup_ok_ = true;
    }
  }
  *why = setup_error_;
  return setup_ok_;
}

bool Session::start_locked(std::string* why) {
  size_t enabled = 0;
  for (; enabled < sizeof kKinds / sizeof kKinds[0]; ++enabled) {
    const CUptiResult r = cuptiActivityEnable(kKinds[enabled]);
    if (r != CUPTI_SUCCESS) {
      *why = "cuptiActivityEnable(kind " + std::to_string(static_cast<int>(kKinds[enabled])) +
             "): " + result_string(r);
      while (enabled > 0) cuptiActivityDisable(kKinds[--enabled]);
      return false;
    }
  }
  // The offset from the tightest of a few bracketed readings.
  int64_t best_gap = std::numeric_limits<int64_t>::max(), offset = 0;
  for (int i = 0; i < 8; ++i) {
    uint64_t t = 0;
    const int64_t before = steady_now_ns();
    const CUptiResult r = cuptiGetTimestamp(&t);
    const int64_t after = steady_now_ns();
    if (r != CUPTI_SUCCESS) {
      *why = std::string("cuptiGetTimestamp: ") + result_string(r);
      stop_locked();
      return false;
    }
    if (after - before < best_gap) {
      best_gap = after - before;
      offset = before + (after - before) / 2 - static_cast<int64_t>(t);
    }
  }
  offset_ns_.store(offset);
  return true;
}

void Session::stop_locked() noexcept {
  for (size_t i = sizeof kKinds / sizeof kKinds[0]; i > 0; --i) {
    const CUptiResult r = cuptiActivityDisable(kKinds[i - 1]);
    if (r != CUPTI_SUCCESS)
      std::fprintf(stderr, "remat: cuptiActivityDisable: %s\n", result_string(r));
  }
  // Drain every buffer (records of incomplete work are dropped by parse()), then forget it all.
  const CUptiResult r = cuptiActivityFlushAll(CUPTI_ACTIVITY_FLAG_FLUSH_FORCED);
  if (r != CUPTI_SUCCESS)
    std::fprintf(stderr, "remat: cuptiActivityFlushAll: %s\n", result_string(r));
  std::lock_guard<std::mutex> dl(data_mu_);
  ops_.clear();
  links_.clear();
  streams_.clear();
  unmatched_.clear();
}

void Session::tell(bool cupti, const std::string& why) {
  bool& told = cupti ? told_cupti_ : told_events_;
  if (told) return;
  told = true;
  if (cupti)
    std::fprintf(stderr, "remat: CUDA op timing from CUPTI activity records\n");
  else
    std::fprintf(stderr, "remat: CUDA op timing from cudaEvents around each op (CUPTI: %s)\n",
                 why.c_str());
}

bool Session::match_locked(const RawActivity& a) {
  const auto dest = streams_.find(a.stream);
  if (dest == streams_.end()) return true;  // a stream nobody traces
  const auto link = links_.find(a.correlation_id);
  if (link == links_.end()) return false;  // not from an op, or its link has not arrived
  const auto op = ops_.find(link->second);
  if (op == ops_.end()) return true;  // forgotten: too late
  dest->second.ready.push_back(CuptiRecord{op->second.label, op->second.tag, a.start_ns, a.end_ns,
                                           a.correlation_id, a.name});
  return true;
}

void Session::forget_ops_locked(StreamState* s, uint64_t up_to) {
  bool any = false;
  while (!s->ops.empty() && s->ops.front() <= up_to) {
    ops_.erase(s->ops.front());
    s->ops.pop_front();
    any = true;
  }
  if (!any) return;
  for (auto it = links_.begin(); it != links_.end();)
    it = ops_.count(it->second) ? std::next(it) : links_.erase(it);
}

}  // namespace

bool cupti_trace_attach(cudaStream_t stream, uint32_t* cupti_stream) {
  try {
    return session().attach(stream, cupti_stream);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "remat: CUPTI tracing not started: %s\n", e.what());
    return false;
  }
}

void cupti_trace_detach(uint32_t cupti_stream) noexcept {
  session().detach(cupti_stream);
}

void cupti_trace_collect(uint32_t cupti_stream, std::vector<CuptiRecord>* out) {
  session().collect(cupti_stream, out);
}

int cupti_trace_attached_streams() {
  return session().attached();
}

CuptiOpScope::CuptiOpScope(uint32_t cupti_stream, const char* label, int tag) {
  session().begin_op(cupti_stream, label, tag);
}

CuptiOpScope::~CuptiOpScope() {
  uint64_t id = 0;
  const CUptiResult r = cuptiActivityPopExternalCorrelationId(kOpCorrelation, &id);
  if (r != CUPTI_SUCCESS)
    std::fprintf(stderr, "remat: cuptiActivityPopExternalCorrelationId: %s\n", result_string(r));
}

}  // namespace remat
