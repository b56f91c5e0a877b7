// NCCL backend for CUDA tensors. Bootstrapped over MPI: rank 0 creates the
// ncclUniqueId and broadcasts it over the MPI group; each process picks its GPU
// from its rank inside an MPI shared-memory (node-local) split. Collectives run
// on the communicator's own CUDA stream: an event recorded on the caller's
// stream (the legacy default stream, LibTorch's default) orders the inputs
// before the NCCL op; Work::wait makes the caller's stream wait on the op's
// completion event and then polls it on the host up to the timeout, aborting
// the NCCL communicator and throwing a one-line error naming the rank when the
// op does not complete (a peer died or ranks disagree).
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace fmoe::parallel {

// Collective over mpi_group (an MPI-backed communicator): every member calls it.
// Throws std::runtime_error naming the rank when no GPU is visible or NCCL fails.
std::unique_ptr<Communicator> make_nccl_communicator(Communicator& mpi_group);

// Number of CUDA devices visible to this process (0 without a GPU or driver).
int cuda_device_count();

}  // namespace fmoe::parallel
