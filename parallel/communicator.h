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

namespace fmoe::parallel {

enum class ReduceOp { kSum, kAvg, kMax };

class Work {
 public:
  virtual ~Work() = default;
  virtual bool is_completed() = 0;
  // Blocks until done; throws std::runtime_error on timeout or failure.
  virtual void wait() = 0;
};

struct AllReduceOptions {
  ReduceOp op = ReduceOp::kSum;
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
};

struct BroadcastOptions {
  int root = 0;
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
};

struct AllGatherOptions {
  std::chrono::milliseconds timeout{std::chrono::minutes(5)};
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
  virtual void barrier() = 0;
};

}  // namespace fmoe::parallel
