// The collective-communication contract every backend implements, shaped like
// c10d's Backend: one virtual per collective, one small options struct per op,
// each returning a Work handle. Collectives are issued in the same order on
// every rank of the group. A backend that lacks an op throws naming itself and
// the op. Work::wait() throws a one-line error naming the rank when the op does
// not complete within its timeout, so a lost peer ends the job instead of
// hanging it.
#pragma once

#include <ATen/core/Tensor.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace fmoe::parallel {

enum class ReduceOp { kSum, kAvg, kMax };

inline constexpr std::chrono::milliseconds kDefaultTimeout{std::chrono::minutes(5)};

class Work {
 public:
  virtual ~Work() = default;
  virtual bool is_completed() = 0;
  // Blocks until done; throws std::runtime_error on timeout or failure.
  virtual void wait() = 0;
};

// A Work that is done when made (groups of one, ops that completed inline).
class CompletedWork : public Work {
 public:
  bool is_completed() override { return true; }
  void wait() override {}
};

struct AllReduceOptions {
  ReduceOp op = ReduceOp::kSum;
  std::chrono::milliseconds timeout = kDefaultTimeout;
};

struct BroadcastOptions {
  int root = 0;
  std::chrono::milliseconds timeout = kDefaultTimeout;
};

struct AllGatherOptions {
  std::chrono::milliseconds timeout = kDefaultTimeout;
};

struct ReduceScatterOptions {
  ReduceOp op = ReduceOp::kSum;
  std::chrono::milliseconds timeout = kDefaultTimeout;
};

struct AllToAllOptions {
  std::chrono::milliseconds timeout = kDefaultTimeout;
};

struct SendRecvOptions {
  int tag = 0;
  std::chrono::milliseconds timeout = kDefaultTimeout;
};

// One send or receive of a group (Communicator::send_recv).
struct P2POp {
  bool send = true;
  at::Tensor tensor;  // what is sent, or where it is received (contiguous)
  int peer = 0;
  int tag = 0;        // as SendRecvOptions::tag
};

// Done when every Work of a group is.
class GroupWork : public Work {
 public:
  explicit GroupWork(std::vector<std::unique_ptr<Work>> works) : works_(std::move(works)) {}
  bool is_completed() override {
    for (auto& w : works_) {
      if (!w->is_completed()) return false;
    }
    return true;
  }
  void wait() override {
    for (auto& w : works_) w->wait();
  }

 private:
  std::vector<std::unique_ptr<Work>> works_;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend_name() const = 0;

  // In place over tensor (contiguous).
  virtual std::unique_ptr<Work> all_reduce(at::Tensor& tensor, const AllReduceOptions& options) = 0;
  virtual std::unique_ptr<Work> broadcast(at::Tensor& tensor, const BroadcastOptions& options) = 0;
  // output holds size() * input.numel() elements, rank-major.
  virtual std::unique_ptr<Work> all_gather(at::Tensor& output, const at::Tensor& input, const AllGatherOptions& options) = 0;
  // input holds size() * output.numel() elements, rank-major; rank r receives block r reduced.
  virtual std::unique_ptr<Work> reduce_scatter(at::Tensor& output, const at::Tensor& input,
                                               const ReduceScatterOptions& options) = 0;
  // Exchanges rows (slices along dim 0): input_splits[r] rows go to rank r, output_splits[r]
  // rows come from rank r, both in rank order. Empty splits mean equal parts. Zero-row
  // splits are allowed.
  virtual std::unique_ptr<Work> all_to_all(at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_splits,
                                           const std::vector<int64_t>& input_splits, const AllToAllOptions& options) = 0;
  virtual std::unique_ptr<Work> send(const at::Tensor& tensor, int dst, const SendRecvOptions& options) = 0;
  virtual std::unique_ptr<Work> recv(at::Tensor& tensor, int src, const SendRecvOptions& options) = 0;
  // Sends and receives that progress together, as one group: one Work, done
  // when all are. NCCL issues them between ncclGroupStart and ncclGroupEnd (ops
  // on its stream otherwise run one after another, and a send completes only
  // once its receive is posted); this default issues each through send and recv.
  virtual std::unique_ptr<Work> send_recv(const std::vector<P2POp>& ops, std::chrono::milliseconds timeout = kDefaultTimeout) {
    std::vector<std::unique_ptr<Work>> works;
    for (const P2POp& op : ops) {
      at::Tensor tensor = op.tensor;
      works.push_back(op.send ? send(tensor, op.peer, {op.tag, timeout}) : recv(tensor, op.peer, {op.tag, timeout}));
    }
    return std::make_unique<GroupWork>(std::move(works));
  }
  virtual void barrier() = 0;
  // Collective over this group: ranks passing the same color form a new group,
  // ordered by key; a negative color returns nullptr.
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  // The timeout of every op whose options leave kDefaultTimeout in place (and of
  // barrier); groups split from this one inherit it.
  void set_default_timeout(std::chrono::milliseconds timeout) { default_timeout_ = timeout; }
  std::chrono::milliseconds default_timeout() const { return default_timeout_; }
  // Seconds this rank has spent blocked in Work::wait on this group: the
  // communication time compute did not hide.
  virtual double wait_seconds() const { return *wait_seconds_; }

 protected:
  std::chrono::milliseconds resolve(std::chrono::milliseconds timeout) const {
    return timeout == kDefaultTimeout ? default_timeout_ : timeout;
  }
  std::chrono::milliseconds default_timeout_ = kDefaultTimeout;
  std::shared_ptr<double> wait_seconds_ = std::make_shared<double>(0.0);
};

}  // namespace fmoe::parallel
