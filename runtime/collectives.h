// Collectives: the communication between the ranks of a data-parallel job, on the
// communication stream (../shared/DESIGN.md "Data parallel").
//
// Two implementations, chosen by the backend:
// - MPI for the CPU backend (this file's make_mpi_collectives): buffers in host memory, the
//   communication stream a CPU stream (one worker thread) that runs every MPI call;
// - NCCL for the CUDA backend (runtime/cuda/nccl_collectives.h): buffers in device memory, the
//   communication stream a CUDA stream; MPI only starts the job and carries the host messages
//   (NCCL's unique id among them).
//
// Threads (MPI): MPI is initialized with MPI_THREAD_SERIALIZED. Every MPI call after
// MPI_Init_thread runs on the communication stream's worker thread -- stream ops as its work
// items, host ops as items the calling thread waits for -- so no two calls ever overlap;
// MPI_Init_thread and MPI_Finalize run on the main thread while that stream is idle.
//
// Order: every rank must issue the same collectives in the same order (the trainer issues
// them in a fixed order derived from the program). Ranks are 0-based.
//
// Faults: no wait is unbounded. A collective that has not completed `timeout_s` after its
// last progress ends this rank with an error naming the ranks it still waits for, and takes
// the whole job down with it (MPI_Abort; NCCL: the communicator is aborted and the process
// exits), so every rank ends within about the timeout. A rank that dies is noticed sooner by
// the launcher (mpirun ends the job when a process exits abnormally).
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/stream.h"

namespace remat {

// Whether a reduction adds to what the destination holds or overwrites it.
enum class Accumulate { kNo, kYes };

class Collectives {
 public:
  virtual ~Collectives() = default;

  virtual const char* name() const = 0;  // "mpi" or "nccl"
  int rank() const { return rank_; }
  int world() const { return world_; }
  // Seconds a collective may go without progress before the job is ended.
  double timeout_s() const { return timeout_s_; }

  // The communication stream: every stream op below is enqueued on it in call order. Work
  // that produces its inputs must be waited for (stream()->wait(producer->record())) and work
  // that reads its outputs must wait on it.
  virtual Stream* stream() = 0;

  // ---- stream ops: n elements of `dt` in the backend's memory ----
  // The ops between group_begin() and group_end() are posted together and complete together
  // (one work item, one trace record named `label`, a static string). Outside a group each
  // op is its own item.
  virtual void group_begin() = 0;
  virtual void group_end(const char* label) = 0;
  // recv (on root only; ignored elsewhere) = the sum over ranks of send. MPI: an exact left
  // fold in rank order, fp32: recv = ((s_0 + s_1) + s_2) ... with kNo (s_0 copied, not added
  // to 0), recv = ((recv + s_0) + s_1) ... with kYes, so the bits are those of one process
  // adding the ranks' buffers one after another. NCCL: ncclReduce's sum (kNo only). send
  // may equal recv (in place); they must not overlap otherwise.
  virtual void reduce_sum(const void* send, void* recv, size_t n, ActDType dt, int root,
                          Accumulate acc, const char* label = "comm.reduce") = 0;
  // recv (every rank) = root's send (read on root only; send may equal recv).
  virtual void broadcast(const void* send, void* recv, size_t n, ActDType dt, int root,
                         const char* label = "comm.broadcast") = 0;
  // buf (every rank) = the sum over ranks of buf, in place; MPI: the rank-order fold above on
  // every rank (the same bits everywhere).
  virtual void all_reduce_sum(void* buf, size_t n, ActDType dt,
                              const char* label = "comm.all_reduce") = 0;

  // ---- host ops: synchronous, after everything already enqueued on stream() ----
  // Every rank's bytes, in rank order (the sizes may differ). timeout_s 0 = timeout_s();
  // setup and checkpoints pass a longer one (one rank may be reading or writing files while
  // the others wait).
  virtual std::vector<std::string> host_all_gather(const std::string& mine,
                                                   double timeout_s = 0) = 0;
  void host_barrier(double timeout_s = 0) { host_all_gather(std::string(), timeout_s); }

 protected:
  Collectives(int rank, int world, double timeout_s)
      : rank_(rank), world_(world), timeout_s_(timeout_s) {}

 private:
  int rank_, world_;
  double timeout_s_;
};

// ---- MPI: the process's place in the job ----

// True when this remat library was built with MPI.
bool mpi_built();
// True when an MPI launcher started this process (mpirun/mpiexec of Open MPI or MPICH, srun:
// OMPI_COMM_WORLD_SIZE, PMI_SIZE or PMIX_RANK in the environment).
bool launched_by_mpi();
// The rank among the processes of this node (OMPI_COMM_WORLD_LOCAL_RANK, MPI_LOCALRANKID or
// SLURM_LOCALID; 0 when none is set): which GPU a rank takes.
int local_rank_from_env();

// MPI for the lifetime of a command. The constructor initializes MPI when the process was
// started by an MPI launcher (MPI_THREAD_SERIALIZED; Error when MPI cannot give it, or when
// remat was built without MPI); otherwise rank 0 of 1 and nothing is initialized. The
// destructor calls MPI_Finalize only after finish(): a rank that leaves by an error exits
// without it, and the launcher then ends the other ranks instead of leaving them waiting.
class MpiSession {
 public:
  MpiSession();
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  bool active() const { return active_; }  // MPI initialized by this session
  int rank() const { return rank_; }
  int world() const { return world_; }
  void finish() { finished_ = true; }

 private:
  bool active_ = false, finished_ = false;
  int rank_ = 0, world_ = 1;
};

// The MPI collectives over MPI_COMM_WORLD for a backend whose memory is host memory (the CPU
// backend; Error otherwise or without an active MpiSession). fp32 only. The communication
// stream is made by the backend (a CPU stream named "remat-comm", id `stream_id`).
std::unique_ptr<Collectives> make_mpi_collectives(Backend& backend, double timeout_s,
                                                  int stream_id = 3);

// ---- NCCL, registered by programs linked with it (runtime/cuda/nccl_collectives.h) ----
struct NcclHooks {
  // Makes the current CUDA device the one for this node-local rank (before the backend).
  void (*select_device)(int local_rank) = nullptr;
  // The NCCL collectives for a CUDA backend: the unique id from rank 0 over MPI.
  std::unique_ptr<Collectives> (*create)(Backend& backend, double timeout_s,
                                         int stream_id) = nullptr;
};
void register_nccl_collectives(const NcclHooks& hooks);
bool nccl_built();
const NcclHooks& nccl_hooks();

// Host helpers over MPI_COMM_WORLD for other implementations (NCCL's id exchange and its host
// ops): every rank's bytes in rank order, bounded by timeout_s as above; called from one
// thread at a time. Error when MPI is not active.
std::vector<std::string> mpi_host_all_gather(const std::string& mine, double timeout_s);
// This process's rank and the world size of MPI_COMM_WORLD (Error when MPI is not active).
void mpi_rank_world(int* rank, int* world);
// Ends the whole job now (MPI_Abort when MPI is active, else _exit) after printing `why`.
[[noreturn]] void abort_job(const std::string& why, int code = 3);

}  // namespace remat
