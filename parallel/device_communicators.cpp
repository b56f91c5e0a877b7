#include "parallel/device_communicators.h"
#include "common/timing.h"

#include <ATen/ATen.h>

#include <chrono>
#include <stdexcept>

namespace fmoe::parallel {
namespace {

// Completes the inner op, then copies each host result back into its device tensor once.
class StagedWork : public Work {
 public:
  StagedWork(std::unique_ptr<Work> inner, std::vector<std::pair<at::Tensor, at::Tensor>> copy_back,
             std::vector<at::Tensor> inputs, double* blocked)
      : inner_(std::move(inner)), copy_back_(std::move(copy_back)), inputs_(std::move(inputs)), blocked_(blocked) {}

  bool is_completed() override {
    if (!done_ && inner_->is_completed()) finish();
    return done_;
  }
  void wait() override {
    const auto start = std::chrono::steady_clock::now();
    inner_->wait();
    finish();
    *blocked_ += common::seconds_since(start);
  }

 private:
  void finish() {
    if (done_) return;
    done_ = true;
    // From page-locked memory the copy is queued on the device's current stream
    // and returns at once; LibTorch's host allocator keeps the buffer until it ran.
    for (auto& [device, host] : copy_back_) device.copy_(host, /*non_blocking=*/host.is_pinned());
    copy_back_.clear();
    inputs_.clear();
  }
  std::unique_ptr<Work> inner_;
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back_;
  std::vector<at::Tensor> inputs_;  // host copies the op still reads until it completes
  double* blocked_;
  bool done_ = false;
};

class StagingCommunicator : public Communicator {
 public:
  StagingCommunicator(std::shared_ptr<Communicator> host, bool always) : host_(std::move(host)), always_(always) {
    default_timeout_ = host_->default_timeout();
  }
  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  std::string backend_name() const override { return host_->backend_name() + " (host-staged)"; }
  double wait_seconds() const override { return host_->wait_seconds() + *wait_seconds_; }

  std::unique_ptr<Work> all_reduce(at::Tensor& tensor, const AllReduceOptions& options) override {
    at::Tensor host = stage_in(tensor);
    AllReduceOptions o = options;
    o.timeout = resolve(options.timeout);
    return finish(host_->all_reduce(host, o), {{tensor, host}});
  }
  std::unique_ptr<Work> broadcast(at::Tensor& tensor, const BroadcastOptions& options) override {
    at::Tensor host = stage_in(tensor);
    BroadcastOptions o = options;
    o.timeout = resolve(options.timeout);
    return finish(host_->broadcast(host, o), {{tensor, host}});
  }
  std::unique_ptr<Work> all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& options) override {
    at::Tensor host_out = stage_out(output);
    AllGatherOptions o = options;
    o.timeout = resolve(options.timeout);
    const at::Tensor host_in = stage_in(input);
    return finish(host_->all_gather(host_out, host_in, o), {{output, host_out}}, {host_in});
  }
  std::unique_ptr<Work> reduce_scatter(at::Tensor& output, const at::Tensor& input, const ReduceScatterOptions& options) override {
    at::Tensor host_out = stage_out(output);
    ReduceScatterOptions o = options;
    o.timeout = resolve(options.timeout);
    const at::Tensor host_in = stage_in(input);
    return finish(host_->reduce_scatter(host_out, host_in, o), {{output, host_out}}, {host_in});
  }
  std::unique_ptr<Work> all_to_all(at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_splits,
                                   const std::vector<int64_t>& input_splits, const AllToAllOptions& options) override {
    at::Tensor host_out = stage_out(output);
    AllToAllOptions o = options;
    o.timeout = resolve(options.timeout);
    const at::Tensor host_in = stage_in(input);
    return finish(host_->all_to_all(host_out, host_in, output_splits, input_splits, o), {{output, host_out}}, {host_in});
  }
  std::unique_ptr<Work> send(const at::Tensor& tensor, int dst, const SendRecvOptions& options) override {
    SendRecvOptions o = options;
    o.timeout = resolve(options.timeout);
    const at::Tensor host_in = stage_in(tensor);
    return finish(host_->send(host_in, dst, o), {}, {host_in});
  }
  std::unique_ptr<Work> recv(at::Tensor& tensor, int src, const SendRecvOptions& options) override {
    at::Tensor host = stage_out(tensor);
    SendRecvOptions o = options;
    o.timeout = resolve(options.timeout);
    return finish(host_->recv(host, src, o), {{tensor, host}});
  }
  void barrier() override {
    host_->set_default_timeout(default_timeout_);
    host_->barrier();
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    host_->set_default_timeout(default_timeout_);
    std::shared_ptr<Communicator> child = host_->split(color, key);
    if (!child) return nullptr;
    return std::make_unique<StagingCommunicator>(std::move(child), always_);
  }

 private:
  bool staged(const at::Tensor& t) const { return always_ || !t.device().is_cpu(); }
  // A host buffer shaped like t (page-locked when t is on a CUDA device).
  static at::Tensor host_buffer(const at::Tensor& t) {
    return at::empty(t.sizes(), t.options().device(at::kCPU).pinned_memory(t.is_cuda()));
  }
  // The input's values on the host. The copy waits for the device work that produces them.
  at::Tensor stage_in(const at::Tensor& t) const {
    if (!staged(t)) return t;
    at::Tensor host = host_buffer(t);
    host.copy_(t);
    return host;
  }
  // Where the host op writes an output (its current values too: all_reduce and broadcast read them).
  at::Tensor stage_out(const at::Tensor& t) const { return staged(t) ? host_buffer(t) : t; }
  std::unique_ptr<Work> finish(std::unique_ptr<Work> inner, std::vector<std::pair<at::Tensor, at::Tensor>> pairs,
                               std::vector<at::Tensor> inputs = {}) {
    std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
    for (auto& [device, host] : pairs) {
      if (!device.is_same(host)) copy_back.emplace_back(device, host);
    }
    return std::make_unique<StagedWork>(std::move(inner), std::move(copy_back), std::move(inputs), wait_seconds_.get());
  }

  std::shared_ptr<Communicator> host_;
  bool always_;
};

class RoutedCommunicator : public Communicator {
 public:
  RoutedCommunicator(std::shared_ptr<Communicator> host, std::shared_ptr<Communicator> device)
      : host_(std::move(host)), device_(std::move(device)) {
    if (host_->size() != device_->size() || host_->rank() != device_->rank()) {
      throw std::invalid_argument("route_by_device: the host and device groups differ");
    }
    default_timeout_ = host_->default_timeout();
  }
  int rank() const override { return host_->rank(); }
  int size() const override { return host_->size(); }
  std::string backend_name() const override { return device_->backend_name() + "+" + host_->backend_name(); }
  double wait_seconds() const override { return host_->wait_seconds() + device_->wait_seconds(); }

  std::unique_ptr<Work> all_reduce(at::Tensor& tensor, const AllReduceOptions& options) override {
    AllReduceOptions o = options;
    o.timeout = resolve(options.timeout);
    return pick(tensor).all_reduce(tensor, o);
  }
  std::unique_ptr<Work> broadcast(at::Tensor& tensor, const BroadcastOptions& options) override {
    BroadcastOptions o = options;
    o.timeout = resolve(options.timeout);
    return pick(tensor).broadcast(tensor, o);
  }
  std::unique_ptr<Work> all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& options) override {
    AllGatherOptions o = options;
    o.timeout = resolve(options.timeout);
    return pick(output).all_gather(output, input, o);
  }
  std::unique_ptr<Work> reduce_scatter(at::Tensor& output, const at::Tensor& input, const ReduceScatterOptions& options) override {
    ReduceScatterOptions o = options;
    o.timeout = resolve(options.timeout);
    return pick(output).reduce_scatter(output, input, o);
  }
  std::unique_ptr<Work> all_to_all(at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_splits,
                                   const std::vector<int64_t>& input_splits, const AllToAllOptions& options) override {
    AllToAllOptions o = options;
    o.timeout = resolve(options.timeout);
    return pick(output).all_to_all(output, input, output_splits, input_splits, o);
  }
  std::unique_ptr<Work> send(const at::Tensor& tensor, int dst, const SendRecvOptions& options) override {
    SendRecvOptions o = options;
    o.timeout = resolve(options.timeout);
    return pick(tensor).send(tensor, dst, o);
  }
  std::unique_ptr<Work> recv(at::Tensor& tensor, int src, const SendRecvOptions& options) override {
    SendRecvOptions o = options;
    o.timeout = resolve(options.timeout);
    return pick(tensor).recv(tensor, src, o);
  }
  std::unique_ptr<Work> send_recv(const std::vector<P2POp>& ops, std::chrono::milliseconds timeout) override {
    if (ops.empty()) return std::make_unique<CompletedWork>();
    Communicator& backend = pick(ops.front().tensor);
    for (const P2POp& op : ops) {
      if (&pick(op.tensor) != &backend) throw std::invalid_argument("route_by_device: a send/receive group mixes CPU and CUDA tensors");
    }
    return backend.send_recv(ops, resolve(timeout));
  }
  void barrier() override {
    host_->set_default_timeout(default_timeout_);
    host_->barrier();
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    // Both splits are collective over the group: every rank makes both, in this order.
    std::shared_ptr<Communicator> host = host_->split(color, key);
    std::shared_ptr<Communicator> device = device_->split(color, key);
    if (!host || !device) return nullptr;
    auto group = std::make_unique<RoutedCommunicator>(std::move(host), std::move(device));
    group->set_default_timeout(default_timeout_);
    return group;
  }

 private:
  Communicator& pick(const at::Tensor& t) const { return t.is_cuda() ? *device_ : *host_; }
  std::shared_ptr<Communicator> host_, device_;
};

}  // namespace

std::unique_ptr<Communicator> with_host_staging(std::shared_ptr<Communicator> host, bool always) {
  return std::make_unique<StagingCommunicator>(std::move(host), always);
}

std::unique_ptr<Communicator> route_by_device(std::shared_ptr<Communicator> host, std::shared_ptr<Communicator> device) {
  return std::make_unique<RoutedCommunicator>(std::move(host), std::move(device));
}

}  // namespace fmoe::parallel
