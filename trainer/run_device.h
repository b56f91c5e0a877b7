// Where a run's tensors live and travel: the rank's device (training.device,
// with the numerics asked of it) and, on GPUs, the world communicator every
// mesh axis is split from (parallel.backend).
#pragma once

#include <c10/core/Device.h>

#include <memory>
#include <string>

#include "config/config.h"

namespace fmoe::parallel {
class Communicator;
}

namespace fmoe::trainer {

using config::Config;

// Ranks of this job on this machine, as the launcher says (world_size without one).
int64_t local_ranks(int world_size);

struct RunDevice {
  c10::Device device{c10::kCPU};
  std::string message;  // "device auto -> cuda:1 (local rank 1, 8 GPUs visible), deterministic algorithms, tf32 off"
};

// training.device resolved for this rank and made current; deterministic
// algorithms and TF32 set as configured. Throws ConfigError naming training.device
// (and why LibTorch's CUDA library did not load, when it did not).
RunDevice setup_device(const Config& config);

// The group every mesh axis is split from on a GPU: NCCL for CUDA tensors beside
// MPI for host ones, or MPI alone through page-locked host buffers where ranks
// share a GPU (NCCL refuses that) or parallel.backend says mpi. Collective over
// world. Throws ConfigError naming parallel.backend; *message says which it chose.
std::shared_ptr<parallel::Communicator> device_world(std::shared_ptr<parallel::Communicator> world, const Config& config,
                                                     int world_size, std::string* message);

}  // namespace fmoe::trainer
