// Communicators for tensors that live on a device.
//
// with_host_staging: a host-only backend (MPI) moving tensors of any device.
// Each op copies its device inputs into host buffers (page-locked for CUDA),
// runs the collective there and copies the outputs back when the Work
// completes. Several ranks can then share one GPU (NCCL refuses that), at the
// cost of two copies per op. `always` stages CPU tensors too, so the staging
// code runs in CPU-only tests exactly as it does for CUDA tensors.
//
// route_by_device: one communicator over two backends of the same group: CUDA
// tensors go to the device backend (NCCL), CPU tensors to the host one (MPI),
// so control messages (config checks, checkpoint shards) keep working beside
// NCCL collectives.
#pragma once

#include <memory>

#include "parallel/communicator.h"

namespace fmoe::parallel {

std::unique_ptr<Communicator> with_host_staging(std::shared_ptr<Communicator> host, bool always = false);

// host and device span the same ranks in the same order.
std::unique_ptr<Communicator> route_by_device(std::shared_ptr<Communicator> host, std::shared_ptr<Communicator> device);

}  // namespace fmoe::parallel
