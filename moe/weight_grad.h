// The backward split that zero-bubble pipeline schedules need (ZB-H1, DualPipeV):
// a stage's input gradient (I) is on the pipeline's critical path, its weight
// gradients (W) are not and run later, where the rank would otherwise wait.
//
// The weight-bearing autograd nodes of the model (moe/linear.h's linear, the
// grouped SwiGLU experts and dense FFNs) consult weight_grad_queue() in their
// backward: with no queue they return every gradient at once; inside a
// DeferWeightGrads scope they return only the input gradient and queue a job
// holding what the weight gradients need (the node's input and output
// gradient). WeightGradQueue::run computes those and hands them to autograd in
// one pass from the node's weight inputs, so casts, gradient hooks and the
// accumulation into .grad() happen as in an undivided backward. RMSNorm gains
// and the embedding keep their (small) weight gradients in I.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <mutex>
#include <vector>

namespace fmoe::moe {

class WeightGradQueue {
 public:
  // Returns the gradients of `weights`, in order (an undefined tensor for none).
  using Compute = std::function<std::vector<at::Tensor>()>;
  // weights: the node's weight inputs as it saved them (a parameter, or its cast).
  void push(std::vector<at::Tensor> weights, Compute compute);
  // Computes every queued job's gradients in order and delivers them through
  // autograd; leaves the queue empty.
  void run();
  bool empty() const;
  size_t size() const;

 private:
  struct Job {
    std::vector<at::Tensor> weights;
    Compute compute;
  };
  mutable std::mutex mutex_;  // on a GPU, autograd runs nodes on its device thread
  std::vector<Job> jobs_;
};

// The queue backward passes defer weight gradients into, or nullptr. Process-wide
// rather than per thread, because a GPU's backward nodes run on autograd's
// device thread, not the one that called backward.
WeightGradQueue* weight_grad_queue();

// While alive, the weight-bearing nodes' backwards defer into `queue`.
class DeferWeightGrads {
 public:
  explicit DeferWeightGrads(WeightGradQueue& queue);
  ~DeferWeightGrads();
  DeferWeightGrads(const DeferWeightGrads&) = delete;
  DeferWeightGrads& operator=(const DeferWeightGrads&) = delete;

 private:
  WeightGradQueue* previous_;
};

}  // namespace fmoe::moe
