#include "parallel/device.h"

#include <ATen/ATen.h>
#include <ATen/DeviceAccelerator.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <mutex>
#include <stdexcept>

namespace fmoe::parallel {
namespace {

// LibTorch's CUDA backend registers itself when its library loads; CPU-only
// binaries link libtorch_cpu alone and load it here when a GPU may be present.
// at::detail::getCUDAHooks() must not be called before that: its first call
// fixes the hooks for the life of the process (the CPU stub when the library is
// not yet loaded), so the load is attempted first. dlopen of a library already
// linked in returns it without loading it twice.
std::string& load_error() {
  static std::string error;
  return error;
}

}  // namespace

bool load_cuda_backend() {
  static std::once_flag once;
  static bool loaded = false;
  std::call_once(once, [] {
#ifdef FMOE_TORCH_LIB_DIR
    loaded = dlopen(FMOE_TORCH_LIB_DIR "/libtorch_cuda.so", RTLD_NOW | RTLD_GLOBAL) != nullptr;
    if (!loaded) load_error() = std::string("LibTorch's CUDA library did not load: ") + dlerror();
#else
    load_error() = "this build does not know where LibTorch's CUDA library is";
#endif
  });
  return loaded;
}

DeviceChoice choose_device(const std::string& requested, int local_rank, int device_count) {
  if (requested != "auto" && requested != "cpu" && requested != "cuda") {
    throw std::invalid_argument("training.device: unknown device '" + requested + "' (auto, cpu or cuda)");
  }
  DeviceChoice choice;
  if (requested == "cpu" || (requested == "auto" && device_count == 0)) {
    choice.message = requested == "cpu" ? "device cpu" : "device auto -> cpu (no CUDA device visible)";
    return choice;
  }
  if (device_count == 0) {
    throw std::invalid_argument("training.device: cuda requested but no CUDA device is visible (check CUDA_VISIBLE_DEVICES and the driver)");
  }
  const int index = std::max(0, local_rank) % device_count;
  choice.device = c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(index));
  choice.message = std::string("device ") + (requested == "auto" ? "auto -> " : "") + choice.device.str() + " (local rank " +
                   std::to_string(local_rank) + ", " + std::to_string(device_count) + " GPU" + (device_count > 1 ? "s" : "") +
                   " visible)";
  return choice;
}

int launcher_local_rank() {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) {
    if (const char* value = std::getenv(name); value && *value) return std::atoi(value);
  }
  return 0;
}

int visible_cuda_devices(bool always_load) {
  // No driver, no GPU: skip loading the CUDA libraries (half a second) on CPU
  // machines, unless CUDA was asked for by name.
  if (!always_load && access("/proc/driver/nvidia/version", F_OK) != 0 && access("/dev/nvidiactl", F_OK) != 0 &&
      access("/dev/nvidia0", F_OK) != 0) {
    return 0;
  }
  if (!load_cuda_backend()) return 0;
  return at::detail::getCUDAHooks().deviceCount();
}

std::string cuda_load_error() { return load_error(); }

void use_device(c10::Device device) {
  if (device.is_cuda()) at::accelerator::setDeviceIndex(device.index());
}

void synchronize(c10::Device device) {
  if (device.is_cuda()) at::accelerator::synchronizeDevice(device.index());
}

int64_t peak_device_memory_bytes(c10::Device device) {
  if (!device.is_cuda()) return 0;
  const auto stats = at::accelerator::getDeviceStats(device.index());
  return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
}

void reset_peak_device_memory(c10::Device device) {
  if (device.is_cuda()) at::accelerator::resetPeakStats(device.index());
}

bool pinned_memory_available(c10::Device device) { return device.is_cuda(); }

}  // namespace fmoe::parallel
