// MPI backend for CPU tensors: fp32, fp64, bf16, int32, int64 (and uint8 for
// movement and max), every op non-blocking underneath so Work::wait can time out.
// BF16 reductions widen each pair to FP32 and round back.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace fmoe::parallel {

// Owns MPI's lifetime: the first instance initialises MPI, the destructor finalises it.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;
  int world_rank() const { return rank_; }
  int world_size() const { return size_; }
  // Ends every rank of the job with the given exit code (after an error on one rank).
  [[noreturn]] static void abort(int code);

 private:
  int rank_ = 0;
  int size_ = 1;
};

// A communicator over MPI_COMM_WORLD (split ones come with the mesh).
std::unique_ptr<Communicator> make_mpi_world_communicator();

// The progress thread: one thread per process that drives every MPI request
// issued while it is on, so that non-blocking operations (a gradient bucket's
// all-reduce started during backward) advance while the caller computes; Open
// MPI otherwise advances them only inside the caller's MPI calls. Needs MPI
// initialised with MPI_THREAD_MULTIPLE (MpiRuntime asks for it): returns false
// and stays off without it. Turn it off before MPI_Finalize (MpiRuntime does).
bool set_mpi_progress_thread(bool on);
bool mpi_progress_thread();
// Whether MPI is initialised with MPI_THREAD_MULTIPLE: several threads of a rank may call it at once.
bool mpi_thread_multiple();

// NCCL's point-to-point rules on CPU ranks, so that code meant for NCCL (the
// pipeline runtime) is tested under them: sends and receives between two ranks
// match in the order they are issued, whatever their tags, and a send completes
// only once its receive is posted (synchronous-mode sends). For tests
// (FMOE_P2P_ISSUE_ORDER=1).
void set_mpi_issue_order_matching(bool on);
bool mpi_issue_order_matching();

}  // namespace fmoe::parallel
