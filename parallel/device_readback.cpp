#include "parallel/device_readback.h"

#include <ATen/ATen.h>
#include <c10/core/Event.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <atomic>
#include <string>

namespace fmoe::parallel {
namespace {
std::atomic<int64_t> g_copies{0};
}  // namespace

size_t StepReadback::add(const at::Tensor& values) {
  const size_t first = size_;
  pending_.push_back(values.detach().reshape({-1}).to(at::kDouble));
  size_ += static_cast<size_t>(pending_.back().numel());
  return first;
}

std::vector<double> StepReadback::read() {
  std::vector<double> out;
  if (pending_.empty()) return out;
  const at::Tensor host = at::cat(pending_).to(at::kCPU).contiguous();
  ++g_copies;
  out.assign(host.data_ptr<double>(), host.data_ptr<double>() + host.numel());
  pending_.clear();
  size_ = 0;
  return out;
}

int64_t StepReadback::copies() { return g_copies.load(); }

struct StepTimer::Events {
  c10::Event begin{c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT};  // timing enabled
  c10::Event end{c10::DeviceType::CUDA, c10::EventFlag::BACKEND_DEFAULT};
};

StepTimer::StepTimer(c10::Device device) : device_(device) {
  if (device_.is_cuda()) events_ = std::make_unique<Events>();
}

StepTimer::~StepTimer() = default;

namespace {
c10::Stream current_stream(c10::Device device) { return c10::impl::getDeviceGuardImpl(device.type())->getStream(device); }
}  // namespace

void StepTimer::start() {
  start_ = std::chrono::steady_clock::now();
  if (events_) events_->begin.record(current_stream(device_));
}

void StepTimer::stop() {
  stop_ = std::chrono::steady_clock::now();
  if (events_) events_->end.record(current_stream(device_));
}

double StepTimer::seconds() const {
  if (!events_) return std::chrono::duration<double>(stop_ - start_).count();
  events_->end.synchronize();  // already done when the step's scalars were read after it
  return events_->begin.elapsedTime(events_->end) / 1000.0;
}

}  // namespace fmoe::parallel
