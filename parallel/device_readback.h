// What the host learns from a training step, and when. On a GPU every host read
// of a device value stalls the CPU until the queue drains, and the next step's
// kernels cannot be queued meanwhile. A step therefore gathers its scalars
// into one device tensor and reads it with one copy (StepReadback), and times
// itself with device events read after that copy (StepTimer).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

namespace fmoe::parallel {

class StepReadback {
 public:
  // Queues values (any shape, any real dtype, on the step's device) for the next read;
  // returns the position of the first in what read() returns.
  size_t add(const at::Tensor& values);
  // Everything added since the last read, in order, as doubles: one copy to the host.
  std::vector<double> read();
  // Device-to-host copies made by every StepReadback of this process so far.
  static int64_t copies();

 private:
  std::vector<at::Tensor> pending_;
  size_t size_ = 0;
};

// A step's duration: CUDA events around the step on a GPU (read once the
// step's scalars have reached the host, so no extra wait), the host clock on the CPU.
class StepTimer {
 public:
  explicit StepTimer(c10::Device device);
  ~StepTimer();
  void start();
  void stop();
  double seconds() const;  // between the last start() and stop()

 private:
  struct Events;
  c10::Device device_;
  std::unique_ptr<Events> events_;
  std::chrono::steady_clock::time_point start_, stop_;
};

}  // namespace fmoe::parallel
