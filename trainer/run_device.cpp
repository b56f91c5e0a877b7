#include "trainer/run_device.h"

#include <ATen/Context.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>

#include "parallel/communicator.h"
#include "parallel/device.h"
#include "parallel/device_communicators.h"
#ifdef FMOE_HAVE_NCCL
#include "parallel/nccl/nccl_communicator.h"
#endif

namespace fmoe::trainer {

using config::Config;
using config::ConfigError;

int64_t local_ranks(int world_size) {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "LOCAL_WORLD_SIZE"}) {
    if (const char* value = std::getenv(name); value && *value) return std::max(1, std::atoi(value));
  }
  return world_size;
}

RunDevice setup_device(const Config& config) {
  const std::string& requested = config.training.device;
  const int devices = requested == "cpu" ? 0 : parallel::visible_cuda_devices(/*always_load=*/requested == "cuda");
  parallel::DeviceChoice choice;
  try {
    choice = parallel::choose_device(requested, parallel::launcher_local_rank(), devices);
  } catch (const std::invalid_argument& e) {
    const std::string why = parallel::cuda_load_error();
    throw ConfigError(std::string(e.what()) + (why.empty() ? "" : " (" + why + ")"));
  }
  parallel::use_device(choice.device);
  if (config.training.deterministic) {
    // cuBLAS reads this before it creates its first handle: its reductions then run in a fixed order.
    setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", /*overwrite=*/0);
    at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);
    at::globalContext().setDeterministicCuDNN(true);
    at::globalContext().setBenchmarkCuDNN(false);
  }
  if (choice.device.is_cuda()) {
    at::globalContext().setAllowTF32CuBLAS(config.precision.tf32);
    at::globalContext().setAllowTF32CuDNN(config.precision.tf32);
  }
  RunDevice run;
  run.device = choice.device;
  run.message = choice.message + (config.training.deterministic ? ", deterministic algorithms" : "") +
                (choice.device.is_cuda() ? (config.precision.tf32 ? ", tf32 on" : ", tf32 off") : "");
  return run;
}

std::shared_ptr<parallel::Communicator> device_world(std::shared_ptr<parallel::Communicator> world, const Config& config,
                                                     int world_size, std::string* message) {
  const int64_t local = local_ranks(world_size);
  const int devices = parallel::visible_cuda_devices();
  const bool shared = local > devices;
#ifdef FMOE_HAVE_NCCL
  const bool have_nccl = true;
#else
  const bool have_nccl = false;
#endif
  std::string backend = config.parallel.backend;
  if (backend == "auto") backend = have_nccl && !shared ? "nccl" : "mpi";
  if (backend == "nccl" && shared) {
    throw ConfigError("parallel.backend: nccl needs a GPU per rank, but " + std::to_string(local) + " ranks share " +
                      std::to_string(devices) + " GPU" + (devices > 1 ? "s" : "") + " on this machine; use mpi");
  }
  if (backend == "nccl" && !have_nccl) throw ConfigError("parallel.backend: nccl is not in this build (built without the CUDA toolkit)");
  *message = std::string("communication: ") + (backend == "nccl" ? "NCCL for device tensors, MPI for host ones"
                                                                  : "MPI through page-locked host buffers");
#ifdef FMOE_HAVE_NCCL
  if (backend == "nccl") return parallel::route_by_device(world, parallel::make_nccl_communicator(*world));
#endif
  return parallel::with_host_staging(world);
}

}  // namespace fmoe::trainer
