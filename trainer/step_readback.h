// What the host learns from a training step, and when. On a GPU every host read
// of a device value stalls the CPU until the queue drains, and the next step's
// kernels cannot be queued meanwhile. The loop therefore gathers the step's
// scalars (losses, gradient norm, expert loads) into one device tensor and reads
// it with one copy; everything else it decides from host values alone.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <vector>

namespace fmoe::trainer {

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

// The step's scalars by name, from what read() returned for the values the
// step added in this order: the losses (cross-entropy, aux, z, then one per MTP
// depth), the gradient norm, then each MoE layer's (max, mean) expert load.
struct StepScalars {
  double loss = 0, aux_loss = 0, z_loss = 0, grad_norm = 0;
  std::vector<double> mtp_losses;           // one per MTP depth
  std::vector<double> load_max, load_mean;  // one per MoE layer
  static StepScalars unpack(const std::vector<double>& values, size_t mtp_depth, size_t moe_layers);
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

}  // namespace fmoe::trainer
