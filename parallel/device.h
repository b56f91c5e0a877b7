// Which device a rank computes on. One GPU per rank: under mpirun a rank takes
// GPU local_rank % device_count. LibTorch's CUDA library is loaded on demand,
// so that CPU runs (tests, laptops) never pay for it; everything above this
// file uses LibTorch's device-generic API (accelerator, events, allocator stats).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <string>

namespace fmoe::parallel {

struct DeviceChoice {
  c10::Device device{c10::kCPU};
  std::string message;  // "device cuda:1 (local rank 3 of 4 GPUs)"
};

// requested: auto | cpu | cuda. auto takes CUDA when a device is visible.
// Throws std::invalid_argument naming training.device when cuda is asked for
// and none is visible, or the value is unknown. Pure.
DeviceChoice choose_device(const std::string& requested, int local_rank, int device_count);

// The node-local rank the launcher gives (OMPI_COMM_WORLD_LOCAL_RANK,
// SLURM_LOCALID or LOCAL_RANK), or 0 when launched without one.
int launcher_local_rank();

// Loads LibTorch's CUDA library (once; true when it is loaded, also when the
// binary links it). Call it before anything queries CUDA: LibTorch fixes its
// CUDA hooks at the first query. cuda_load_error() says why it failed.
bool load_cuda_backend();

// CUDA devices LibTorch can use: loads LibTorch's CUDA library the first time
// when an NVIDIA driver is present (always_load: whether or not one is seen);
// 0 on machines without one.
int visible_cuda_devices(bool always_load = false);

// Why LibTorch's CUDA library could not be loaded (empty when it was, or was not tried).
std::string cuda_load_error();

// Makes device current for this thread (a no-op for the CPU).
void use_device(c10::Device device);

// Waits for the device's queued work (a no-op for the CPU).
void synchronize(c10::Device device);

// Peak bytes held by LibTorch's caching allocator on device since the last reset (0 for the CPU).
int64_t peak_device_memory_bytes(c10::Device device);
void reset_peak_device_memory(c10::Device device);

// Host memory that copies to and from device can run asynchronously with
// (page-locked for CUDA); plain memory for the CPU.
bool pinned_memory_available(c10::Device device);

}  // namespace fmoe::parallel
