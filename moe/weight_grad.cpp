#include "moe/weight_grad.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/grad_mode.h>

#include <atomic>

namespace fmoe::moe {
namespace {

std::atomic<WeightGradQueue*> current{nullptr};

}  // namespace

void WeightGradQueue::push(std::vector<at::Tensor> weights, Compute compute) {
  std::lock_guard<std::mutex> lock(mutex_);
  jobs_.push_back({std::move(weights), std::move(compute)});
}

bool WeightGradQueue::empty() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return jobs_.empty();
}

size_t WeightGradQueue::size() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return jobs_.size();
}

void WeightGradQueue::run() {
  std::vector<Job> jobs;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    jobs.swap(jobs_);
  }
  std::vector<at::Tensor> roots, grads;
  {
    // The jobs' inputs may require gradients themselves: compute without a graph.
    torch::autograd::AutoGradMode no_graph(false);
    for (Job& job : jobs) {
      const std::vector<at::Tensor> g = job.compute();
      for (size_t i = 0; i < job.weights.size() && i < g.size(); ++i) {
        if (!g[i].defined() || !job.weights[i].requires_grad()) continue;
        roots.push_back(job.weights[i]);
        grads.push_back(g[i]);
      }
      job.compute = nullptr;  // frees what it captured
    }
  }
  if (!roots.empty()) torch::autograd::backward(roots, grads);
}

WeightGradQueue* weight_grad_queue() { return current.load(); }

DeferWeightGrads::DeferWeightGrads(WeightGradQueue& queue) : previous_(current.exchange(&queue)) {}

DeferWeightGrads::~DeferWeightGrads() { current.store(previous_); }

}  // namespace fmoe::moe
