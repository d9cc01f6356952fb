// The MPI collectives (runtime/collectives.h) and the process's MPI session.
//
// Every stream op is built from nonblocking point-to-point messages (MPI_Isend/MPI_Irecv on
// MPI_COMM_WORLD) and a polled wait, never from MPI's own reductions, for two reasons:
// - the sums are exact left folds in rank order, computed here, so the bits do not depend on
//   the MPI library's reduction algorithm or on the world size's tree shape;
// - a wait knows which peers it still expects, so a timeout names them.
// A reduction to a root costs the root (W-1) n elements in and every other rank n out; the
// trainer spreads the roots over the ranks (each owns a shard of the buffer), which makes a
// bucket's reductions an all-to-all, as a reduce-scatter would be.
#include "runtime/collectives.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <thread>

#include "base/error.h"

#ifdef REMAT_WITH_MPI
#include <mpi.h>
#endif

namespace remat {
namespace {

bool g_mpi_active = false;  // set by MpiSession, on the main thread, before any stream exists

std::mutex g_nccl_mu;
NcclHooks g_nccl_hooks;

const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

}  // namespace

bool mpi_built() {
#ifdef REMAT_WITH_MPI
  return true;
#else
  return false;
#endif
}

bool launched_by_mpi() {
  return env("OMPI_COMM_WORLD_SIZE") || env("PMI_SIZE") || env("PMIX_RANK") || env("PMI_RANK") ||
         env("MPI_LOCALNRANKS");
}

int local_rank_from_env() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID"})
    if (const char* v = env(name)) return std::atoi(v);
  return 0;
}

void register_nccl_collectives(const NcclHooks& hooks) {
  std::lock_guard<std::mutex> lk(g_nccl_mu);
  g_nccl_hooks = hooks;
}

bool nccl_built() {
  std::lock_guard<std::mutex> lk(g_nccl_mu);
  return g_nccl_hooks.create != nullptr;
}

const NcclHooks& nccl_hooks() {
  std::lock_guard<std::mutex> lk(g_nccl_mu);
  return g_nccl_hooks;
}

#ifndef REMAT_WITH_MPI

MpiSession::MpiSession() {
  REMAT_REQUIRE(!launched_by_mpi(),
                "this process was started by an MPI launcher (mpirun), but remat was built "
                "without MPI: install Open MPI (scripts/setup.sh does) and build again");
}
MpiSession::~MpiSession() = default;

std::unique_ptr<Collectives> make_mpi_collectives(Backend&, double, int) {
  throw Error("data parallel needs MPI, and remat was built without it");
}

std::vector<std::string> mpi_host_all_gather(const std::string&, double) {
  throw Error("data parallel needs MPI, and remat was built without it");
}
void mpi_rank_world(int*, int*) {
  throw Error("data parallel needs MPI, and remat was built without it");
}

void abort_job(const std::string& why, int code) {
  std::fprintf(stderr, "remat: %s\n", why.c_str());
  std::fflush(stderr);
  _exit(code);
}

#else  // REMAT_WITH_MPI

namespace {

constexpr int kTagStream = 1;  // stream ops
constexpr int kTagHost = 2;    // host ops
// Largest piece one MPI message carries (counts are int).
constexpr size_t kMaxMessageBytes = size_t(1) << 30;

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string s;
  for (size_t i = 0; i < ranks.size(); i++) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s;
}

// Outstanding messages of one wait, with the peer and direction of each.
class Requests {
 public:
  void recv(void* p, size_t bytes, int from, int tag) { post(p, bytes, from, tag, false); }
  void send(const void* p, size_t bytes, int to, int tag) {
    post(const_cast<void*>(p), bytes, to, tag, true);
  }

  // Waits for all, polling; ends the job when `timeout_s` pass without any completing.
  void wait(double timeout_s, const char* what) {
    std::vector<int> done(reqs_.size());
    double last = now_s();
    int idle = 0;
    size_t left = reqs_.size();
    while (left > 0) {
      int n = 0;
      MPI_Testsome(static_cast<int>(reqs_.size()), reqs_.data(), &n, done.data(),
                   MPI_STATUSES_IGNORE);
      if (n == MPI_UNDEFINED) break;
      if (n > 0) {
        left -= static_cast<size_t>(n);
        last = now_s();
        idle = 0;
        continue;
      }
      if (now_s() - last > timeout_s) timed_out(timeout_s, what);
      // Spin briefly (latency), then yield the core to the compute threads.
      if (++idle > 200) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    reqs_.clear();
    peer_.clear();
    is_send_.clear();
  }

 private:
  void post(void* p, size_t bytes, int peer, int tag, bool is_send) {
    char* c = static_cast<char*>(p);
    do {  // zero-byte messages too: the peer posts the matching one
      const size_t n = std::min(bytes, kMaxMessageBytes);
      MPI_Request r;
      if (is_send)
        MPI_Isend(c, static_cast<int>(n), MPI_BYTE, peer, tag, MPI_COMM_WORLD, &r);
      else
        MPI_Irecv(c, static_cast<int>(n), MPI_BYTE, peer, tag, MPI_COMM_WORLD, &r);
      reqs_.push_back(r);
      peer_.push_back(peer);
      is_send_.push_back(is_send);
      c += n;
      bytes -= n;
    } while (bytes > 0);
  }

  [[noreturn]] void timed_out(double timeout_s, const char* what) {
    std::vector<int> from, to;
    for (size_t i = 0; i < reqs_.size(); i++) {
      if (reqs_[i] == MPI_REQUEST_NULL) continue;
      std::vector<int>& v = is_send_[i] ? to : from;
      if (std::find(v.begin(), v.end(), peer_[i]) == v.end()) v.push_back(peer_[i]);
    }
    std::sort(from.begin(), from.end());
    std::sort(to.begin(), to.end());
    int me = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    char t[32];
    std::snprintf(t, sizeof t, "%g", timeout_s);
    std::string msg = "rank " + std::to_string(me) + ": " + what + ": ";
    if (!from.empty())
      msg += "no data from rank " + rank_list(from) + " for " + t + " s";
    else
      msg += "rank " + rank_list(to) + " took no data for " + t + " s";
    std::vector<int> all = from;
    for (int r : to)
      if (std::find(all.begin(), all.end(), r) == all.end()) all.push_back(r);
    msg += std::string(" (--comm-timeout): ") +
           (all.size() > 1 ? "they died or stall" : "it died or stalls") +
           "; ending the job on every rank";
    abort_job(msg, 3);
  }

  std::vector<MPI_Request> reqs_;
  std::vector<int> peer_;
  std::vector<char> is_send_;
};

std::vector<std::string> host_all_gather_impl(const std::string& mine, double timeout_s) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  std::vector<uint64_t> sizes(world, 0);
  sizes[rank] = mine.size();
  Requests q;
  for (int p = 0; p < world; p++) {
    if (p == rank) continue;
    q.recv(&sizes[p], sizeof(uint64_t), p, kTagHost);
    q.send(&sizes[rank], sizeof(uint64_t), p, kTagHost);
  }
  q.wait(timeout_s, "exchanging host messages");
  std::vector<std::string> out(world);
  for (int p = 0; p < world; p++) {
    if (p == rank) {
      out[p] = mine;
      continue;
    }
    out[p].resize(sizes[p]);
    q.recv(out[p].data(), sizes[p], p, kTagHost);
    q.send(mine.data(), mine.size(), p, kTagHost);
  }
  q.wait(timeout_s, "exchanging host messages");
  return out;
}

// One queued stream op.
struct Op {
  enum class Kind { kReduce, kBroadcast, kAllReduce } kind;
  const void* send;
  void* recv;
  size_t n;
  int root;
  Accumulate acc;
};

class MpiCollectives final : public Collectives {
 public:
  MpiCollectives(Backend& be, int rank, int world, double timeout_s, int stream_id)
      : Collectives(rank, world, timeout_s), stream_(be.make_stream("remat-comm", stream_id)) {}

  ~MpiCollectives() override {
    try {
      stream_->synchronize();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "remat: communication stream: %s\n", e.what());
    }
  }

  const char* name() const override { return "mpi"; }
  Stream* stream() override { return stream_.get(); }

  void group_begin() override {
    REMAT_CHECK(!in_group_, "collectives: group_begin inside a group");
    in_group_ = true;
  }
  void group_end(const char* label) override {
    REMAT_CHECK(in_group_, "collectives: group_end without group_begin");
    in_group_ = false;
    flush(label);
  }

  void reduce_sum(const void* send, void* recv, size_t n, ActDType dt, int root, Accumulate acc,
                  const char* label) override {
    check(dt, root);
    REMAT_CHECK(rank() != root || recv != nullptr, "reduce_sum: no destination on the root");
    const char* s = static_cast<const char*>(send);
    const char* r = static_cast<const char*>(recv);
    REMAT_CHECK(rank() != root || n == 0 || s == r || r + 4 * n <= s || s + 4 * n <= r,
                "reduce_sum: recv overlaps send without being it");
    REMAT_CHECK(s != r || acc == Accumulate::kNo, "reduce_sum: in place needs Accumulate::kNo");
    add({Op::Kind::kReduce, send, recv, n, root, acc}, label);
  }

  void broadcast(const void* send, void* recv, size_t n, ActDType dt, int root,
                 const char* label) override {
    check(dt, root);
    add({Op::Kind::kBroadcast, send, recv, n, root, Accumulate::kNo}, label);
  }

  void all_reduce_sum(void* buf, size_t n, ActDType dt, const char* label) override {
    check(dt, 0);
    add({Op::Kind::kAllReduce, buf, buf, n, 0, Accumulate::kNo}, label);
  }

  std::vector<std::string> host_all_gather(const std::string& mine, double timeout_s) override {
    REMAT_CHECK(!in_group_, "collectives: a host op inside a group");
    std::vector<std::string> out;
    const double t = timeout_s > 0 ? timeout_s : this->timeout_s();
    stream_->launch([&out, &mine, t] { out = host_all_gather_impl(mine, t); }, "comm.host");
    stream_->synchronize();
    return out;
  }

 private:
  void check(ActDType dt, int root) const {
    REMAT_CHECK(dt == ActDType::kFP32, "MPI collectives: fp32 only (the CPU backend)");
    REMAT_CHECK(root >= 0 && root < world(), "collectives: root out of range");
  }

  void add(const Op& op, const char* label) {
    pending_.push_back(op);
    if (!in_group_) flush(label);
  }

  void flush(const char* label) {
    if (pending_.empty()) return;
    stream_->launch([this, ops = std::move(pending_)] { run(ops); }, label);
    pending_.clear();
  }

  // On the stream's worker: post every message of the group, wait, then fold.
  void run(const std::vector<Op>& ops) {
    const int me = rank(), W = world();
    size_t stage_floats = 0;
    for (const Op& op : ops) {
      if (op.kind == Op::Kind::kReduce && op.root == me) stage_floats += op.n * W;
      if (op.kind == Op::Kind::kAllReduce) stage_floats += op.n * W;
    }
    if (stage_.size() < stage_floats) stage_.resize(stage_floats);
    std::vector<const float*> base(ops.size(), nullptr);  // per op: W staged buffers
    float* next = stage_.data();
    Requests q;
    for (size_t k = 0; k < ops.size(); k++) {
      const Op& op = ops[k];
      const size_t bytes = op.n * sizeof(float);
      switch (op.kind) {
        case Op::Kind::kReduce:
          if (me == op.root) {
            base[k] = next;
            for (int p = 0; p < W; p++)
              if (p != me) q.recv(next + p * op.n, bytes, p, kTagStream);
            next += op.n * W;
          } else {
            q.send(op.send, bytes, op.root, kTagStream);
          }
          break;
        case Op::Kind::kBroadcast:
          if (me == op.root) {
            for (int p = 0; p < W; p++)
              if (p != me) q.send(op.send, bytes, p, kTagStream);
            if (op.recv != op.send) std::memcpy(op.recv, op.send, bytes);
          } else {
            q.recv(op.recv, bytes, op.root, kTagStream);
          }
          break;
        case Op::Kind::kAllReduce:
          base[k] = next;
          for (int p = 0; p < W; p++)
            if (p != me) {
              q.recv(next + p * op.n, bytes, p, kTagStream);
              q.send(op.send, bytes, p, kTagStream);
            }
          next += op.n * W;
          break;
      }
    }
    q.wait(timeout_s(), "a gradient or weight exchange");
    for (size_t k = 0; k < ops.size(); k++) {
      const Op& op = ops[k];
      if (base[k] == nullptr) continue;
      auto src = [&](int p) {
        return p == me ? static_cast<const float*>(op.send) : base[k] + p * op.n;
      };
      if (op.kind == Op::Kind::kReduce) {
        if (op.send == op.recv) {  // in place: this rank's part read before it is overwritten
          float* own = const_cast<float*>(base[k]) + me * op.n;
          std::memcpy(own, op.send, op.n * sizeof(float));
          fold(
              static_cast<float*>(op.recv), [&](int p) { return base[k] + p * op.n; }, op.n,
              Accumulate::kNo);
          continue;
        }
        fold(static_cast<float*>(op.recv), src, op.n, op.acc);
      } else {  // all-reduce: fold into this rank's stage slot, then copy over the buffer
        float* tmp = const_cast<float*>(base[k]) + me * op.n;
        fold(tmp, src, op.n, Accumulate::kNo);
        std::memcpy(op.recv, tmp, op.n * sizeof(float));
      }
    }
  }

  // dst = (dst +) src(0) + src(1) + ... element by element, ranks in order.
  template <typename Src>
  void fold(float* dst, const Src& src, size_t n, Accumulate acc) const {
    for (int p = 0; p < world(); p++) {
      const float* s = src(p);
      if (p == 0 && acc == Accumulate::kNo) {
        if (dst != s) std::memmove(dst, s, n * sizeof(float));
        continue;
      }
      for (size_t i = 0; i < n; i++) dst[i] += s[i];
    }
  }

  std::unique_ptr<Stream> stream_;
  bool in_group_ = false;
  std::vector<Op> pending_;   // host thread
  std::vector<float> stage_;  // worker thread: received buffers of the running group
};

}  // namespace

MpiSession::MpiSession() {
  if (!launched_by_mpi()) return;
  int inited = 0;
  MPI_Initialized(&inited);
  REMAT_CHECK(!inited, "MPI is already initialized");
  int provided = MPI_THREAD_SINGLE;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided);
  REMAT_REQUIRE(provided >= MPI_THREAD_SERIALIZED,
                "the MPI library gives thread level " + std::to_string(provided) +
                    "; remat needs MPI_THREAD_SERIALIZED (its communication stream is a thread)");
  MPI_Comm_rank(MPI_COMM_WORLD, &rank_);
  MPI_Comm_size(MPI_COMM_WORLD, &world_);
  active_ = true;
  g_mpi_active = true;
}

MpiSession::~MpiSession() {
  if (!active_ || !finished_) return;  // an error: leave without MPI_Finalize (see header)
  g_mpi_active = false;
  MPI_Finalize();
}

std::unique_ptr<Collectives> make_mpi_collectives(Backend& backend, double timeout_s,
                                                  int stream_id) {
  REMAT_REQUIRE(g_mpi_active, "data parallel: MPI is not initialized (start remat with mpirun)");
  REMAT_REQUIRE(std::string(backend.name()) == "cpu",
                std::string("the MPI collectives work on host memory (the CPU backend); the ") +
                    backend.name() + " backend needs NCCL");
  REMAT_REQUIRE(timeout_s > 0, "--comm-timeout must be > 0 seconds");
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  return std::make_unique<MpiCollectives>(backend, rank, world, timeout_s, stream_id);
}

std::vector<std::string> mpi_host_all_gather(const std::string& mine, double timeout_s) {
  REMAT_REQUIRE(g_mpi_active, "MPI is not initialized");
  return host_all_gather_impl(mine, timeout_s);
}

void mpi_rank_world(int* rank, int* world) {
  REMAT_REQUIRE(g_mpi_active, "MPI is not initialized");
  MPI_Comm_rank(MPI_COMM_WORLD, rank);
  MPI_Comm_size(MPI_COMM_WORLD, world);
}

void abort_job(const std::string& why, int code) {
  std::fprintf(stderr, "remat: %s\n", why.c_str());
  std::fflush(stderr);
  std::fflush(stdout);
  if (g_mpi_active) MPI_Abort(MPI_COMM_WORLD, code);
  _exit(code);
}

#endif  // REMAT_WITH_MPI

}  // namespace remat
