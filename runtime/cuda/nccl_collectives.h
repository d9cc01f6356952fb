// The NCCL collectives (runtime/collectives.h) for the CUDA backend: one NCCL communicator
// over the MPI job (rank 0's ncclUniqueId reaches the others over MPI), its ops on the
// communication stream, a CUDA stream of the backend.
//
// - Reductions are NCCL's sums (ncclReduce, ncclAllReduce; fp32 or bf16): the same bits from
//   run to run on the same ranks, GPUs and NCCL version, not an exact fold in rank order, so
//   Accumulate::kYes is refused (the trainer reduces CUDA gradients once, in place).
// - Host ops go over MPI from the calling thread after the communication stream is idle.
// - A watchdog thread follows every enqueued group by a CUDA event; when one has not
//   completed `timeout_s` after the one before it did, it aborts the communicator (which
//   releases the kernels waiting for the missing rank) and ends the job (abort_job).
#pragma once
#include <memory>

#include "runtime/collectives.h"

namespace remat {

// Registers the NCCL collectives with make_collectives() (programs linked with remat_cuda and
// NCCL call it once at start, beside install_cuda_backend()).
void install_nccl_collectives();

// The collectives themselves (MPI must be active; the backend must be the CUDA backend).
std::unique_ptr<Collectives> make_nccl_collectives(Backend& backend, double timeout_s,
                                                   int stream_id);

}  // namespace remat
