#include "trainer/zero1.h"

#include <ATen/ATen.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "parallel/grad_sync.h"

namespace fmoe::trainer {

using config::OptimizerConfig;
using checkpoint::TensorMap;

Zero1::Zero1(const std::vector<NamedParameter>& params, const std::vector<bool>& sharded_over_tp, const std::vector<bool>& expert,
             const parallel::Mesh& mesh, const OptimizerConfig& config, const moe::ModelConfig* model)
    : params_(params), sharded_over_tp_(sharded_over_tp), expert_(expert), owned_(params.size(), false), mesh_(&mesh),
      options_(at::TensorOptions().dtype(at::kFloat).device(params.empty() ? at::Device(at::kCPU) : params.front().tensor.device())) {
  for (bool experts : {false, true}) {
    Partition p;
    p.group = experts ? &mesh.edp() : &mesh.dp();
    for (size_t i = 0; i < params_.size(); ++i) {
      if (expert_[i] == experts) p.members.push_back(i);
    }
    // Largest first onto the least-loaded rank: the same deterministic plan on every rank.
    std::vector<size_t> order(p.members.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      return params_[p.members[a]].tensor.numel() > params_[p.members[b]].tensor.numel();
    });
    std::vector<int64_t> load(static_cast<size_t>(p.group->size()), 0);
    p.owner.assign(p.members.size(), 0);
    p.offset.assign(p.members.size(), 0);
    for (size_t k : order) {
      const auto r = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
      p.owner[k] = static_cast<int64_t>(r);
      p.offset[k] = load[r];
      load[r] += params_[p.members[k]].tensor.numel();
    }
    p.segment = load.empty() ? 0 : *std::max_element(load.begin(), load.end());
    for (size_t k = 0; k < p.members.size(); ++k) {
      if (p.owner[k] == p.group->rank()) owned_[p.members[k]] = true;
    }
    partitions_.push_back(std::move(p));
  }
  std::vector<NamedParameter> mine;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (owned_[i]) mine.push_back(params_[i]);
  }
  optimizer_ = std::make_unique<Optimizer>(mine, config, model);
  for (const NamedParameter& p : params_) muon_.push_back(muon_matrices(p.name, p.tensor.sizes(), config, model).matrix);
}

TensorMap Zero1::full_state() const {
  if (!optimizer_->all_fp32()) throw std::logic_error("Zero1::full_state: FP32 state only");
  const TensorMap owned = optimizer_->state();
  TensorMap full;
  for (const Partition& p : partitions_) {
    for (size_t k = 0; k < p.members.size(); ++k) {
      const NamedParameter& param = params_[p.members[k]];
      for (const std::string moment : {"exp_avg.", "exp_avg_sq."}) {
        if (moment == "exp_avg_sq." && muon_[p.members[k]]) continue;
        const std::string key = moment + param.name + ".data";
        at::Tensor t = p.owner[k] == p.group->rank() ? owned.at(key).clone() : at::empty(param.tensor.sizes(), options_);
        if (p.group->size() > 1) p.group->broadcast(t, {static_cast<int>(p.owner[k])})->wait();
        full[key] = t;
      }
    }
  }
  full["optimizer_steps"] = owned.at("optimizer_steps");
  return full;
}

int64_t Zero1::owned_numel() const {
  int64_t n = 0;
  for (size_t i = 0; i < params_.size(); ++i) n += owned_[i] ? params_[i].tensor.numel() : 0;
  return n;
}

void Zero1::reduce_scatter_gradients() {
  const double dp = static_cast<double>(mesh_->shape().dp);
  for (const Partition& p : partitions_) {
    const int64_t ranks = p.group->size();
    at::Tensor flat = at::zeros({ranks * p.segment}, options_);
    for (size_t k = 0; k < p.members.size(); ++k) {
      const at::Tensor& t = params_[p.members[k]].tensor;
      if (t.grad().defined()) flat.narrow(0, p.owner[k] * p.segment + p.offset[k], t.numel()).copy_(t.grad().reshape({-1}));
    }
    at::Tensor mine = at::empty({p.segment}, options_);
    p.group->reduce_scatter(mine, flat, {parallel::ReduceOp::kSum})->wait();
    // Every dp rank's loss weighs 1 / dp (experts: summed over edp, divided by dp).
    mine.div_(dp);
    for (size_t k = 0; k < p.members.size(); ++k) {
      at::Tensor& t = params_[p.members[k]].tensor;
      if (p.owner[k] == p.group->rank()) {
        const at::Tensor g = mine.narrow(0, p.offset[k], t.numel()).view_as(t);
        if (t.grad().defined()) {
          t.mutable_grad().copy_(g);
        } else {
          t.mutable_grad() = g.clone();
        }
      } else {
        t.mutable_grad() = at::Tensor();  // another rank's: its memory goes back now
      }
    }
  }
}

at::Tensor Zero1::clip_grad_norm(double max_norm) {
  std::vector<at::Tensor> all, grads;
  for (size_t i = 0; i < params_.size(); ++i) {
    all.push_back(params_[i].tensor.grad());
    if (owned_[i] && all.back().defined()) grads.push_back(all.back());
  }
  const at::Tensor total = parallel::global_grad_square_sum(all, sharded_over_tp_, expert_, *mesh_, &owned_).sqrt();
  scale_to_norm(grads, total, max_norm);
  return total;
}

void Zero1::step(double lr) {
  optimizer_->step(lr);
  for (const Partition& p : partitions_) gather_parameters(p);
}

void Zero1::gather_parameters(const Partition& p) {
  torch::NoGradGuard no_grad;
  const int64_t ranks = p.group->size();
  if (ranks == 1) return;
  at::Tensor mine = at::zeros({p.segment}, options_);
  for (size_t k = 0; k < p.members.size(); ++k) {
    if (p.owner[k] == p.group->rank()) {
      const at::Tensor& t = params_[p.members[k]].tensor;
      mine.narrow(0, p.offset[k], t.numel()).copy_(t.reshape({-1}));
    }
  }
  at::Tensor all = at::empty({ranks * p.segment}, options_);
  p.group->all_gather(all, mine, {})->wait();
  for (size_t k = 0; k < p.members.size(); ++k) {
    if (p.owner[k] == p.group->rank()) continue;
    at::Tensor& t = params_[p.members[k]].tensor;
    t.copy_(all.narrow(0, p.owner[k] * p.segment + p.offset[k], t.numel()).view_as(t));
  }
}

}  // namespace fmoe::trainer
