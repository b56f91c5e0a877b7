#include "trainer/optimizer.h"

#include <ATen/ATen.h>

#include <cmath>
#include <numbers>
#include <stdexcept>

namespace fmoe::trainer {

ParamKind classify_parameter(const std::string& name) {
  if (name.find("norm") != std::string::npos) return ParamKind::kNorm;
  if (name.rfind("embedding.", 0) == 0) return ParamKind::kEmbedding;
  if (name.rfind("head.", 0) == 0) return ParamKind::kHead;
  if (name.find("router") != std::string::npos) return ParamKind::kRouter;
  if (name.find(".moe.w") != std::string::npos) return ParamKind::kExpert;
  return ParamKind::kDense;
}

bool decays(ParamKind kind, const OptimizerConfig& config) {
  switch (kind) {
    case ParamKind::kNorm: return config.decay_norms;
    case ParamKind::kEmbedding: return config.decay_embedding;
    case ParamKind::kRouter: return config.decay_router;
    default: return true;
  }
}

AdamW::AdamW(std::vector<NamedParameter> parameters, const OptimizerConfig& config)
    : params_(std::move(parameters)), config_(config) {
  Group decay{config.weight_decay, {}}, no_decay{0.0, {}};
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i].tensor;
    exp_avg_.push_back(at::zeros_like(p));
    exp_avg_sq_.push_back(at::zeros_like(p));
    (decays(classify_parameter(params_[i].name), config) ? decay : no_decay).members.push_back(i);
  }
  for (Group* group : {&decay, &no_decay}) {
    if (!group->members.empty()) groups_.push_back(std::move(*group));
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  const double step = static_cast<double>(steps_taken_ + 1);
  const double bias_correction1 = 1.0 - std::pow(config_.beta1, step);
  const double bias_correction2 = 1.0 - std::pow(config_.beta2, step);
  for (const Group& group : groups_) {
    std::vector<at::Tensor> p, g, m, v;
    for (size_t i : group.members) {
      const at::Tensor& grad = params_[i].tensor.grad();
      if (!grad.defined()) continue;
      p.push_back(params_[i].tensor);
      g.push_back(grad);
      m.push_back(exp_avg_[i]);
      v.push_back(exp_avg_sq_[i]);
    }
    if (p.empty()) continue;
    // Multi-tensor (foreach) kernels: a handful of passes over all tensors of the group.
    at::_foreach_lerp_(m, g, 1.0 - config_.beta1);
    at::_foreach_mul_(v, config_.beta2);
    at::_foreach_addcmul_(v, g, g, 1.0 - config_.beta2);
    if (group.weight_decay > 0) at::_foreach_mul_(p, 1.0 - lr * group.weight_decay);
    std::vector<at::Tensor> denom = at::_foreach_sqrt(v);
    at::_foreach_div_(denom, std::sqrt(bias_correction2));
    at::_foreach_add_(denom, config_.eps);
    at::_foreach_addcdiv_(p, m, denom, -lr / bias_correction1);
  }
  ++steps_taken_;
}

TensorMap AdamW::state() const {
  TensorMap state;
  for (size_t i = 0; i < params_.size(); ++i) {
    state["exp_avg." + params_[i].name] = exp_avg_[i];
    state["exp_avg_sq." + params_[i].name] = exp_avg_sq_[i];
  }
  state["optimizer_steps"] = at::full({}, steps_taken_, at::kLong);
  return state;
}

void AdamW::load_state(const TensorMap& state, const std::string& source) {
  auto fetch = [&](const std::string& key, const at::Tensor& like) {
    const auto it = state.find(key);
    if (it == state.end()) throw std::runtime_error(source + ": optimizer state '" + key + "' is missing");
    if (!it->second.sizes().equals(like.sizes()) || it->second.scalar_type() != like.scalar_type()) {
      throw std::runtime_error(source + ": optimizer state '" + key + "' has the wrong shape or dtype");
    }
    return it->second;
  };
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    exp_avg_[i].copy_(fetch("exp_avg." + params_[i].name, exp_avg_[i]));
    exp_avg_sq_[i].copy_(fetch("exp_avg_sq." + params_[i].name, exp_avg_sq_[i]));
  }
  steps_taken_ = fetch("optimizer_steps", at::zeros({}, at::kLong)).item<int64_t>();
}

double learning_rate(const OptimizerConfig& c, int64_t step, int64_t total_steps) {
  if (step < c.warmup_steps) return c.lr * static_cast<double>(step + 1) / static_cast<double>(c.warmup_steps);
  if (c.lr_schedule == "constant") return c.lr;
  const double after = static_cast<double>(step - c.warmup_steps);
  const double span = static_cast<double>(std::max<int64_t>(1, total_steps - c.warmup_steps));
  if (c.lr_schedule == "cosine") {
    const double progress = std::min(1.0, after / span);
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
  }
  // wsd: stable at lr, then a linear decay to min_lr over the last fraction of all steps.
  const double decay_steps = c.wsd_decay_fraction * static_cast<double>(total_steps);
  const double decay_start = static_cast<double>(total_steps) - decay_steps;
  if (static_cast<double>(step) < decay_start || decay_steps <= 0) return c.lr;
  const double progress = std::min(1.0, (static_cast<double>(step) - decay_start) / decay_steps);
  return c.lr + (c.min_lr - c.lr) * progress;
}

double clip_grad_norm(const std::vector<at::Tensor>& grads, double max_norm) {
  if (grads.empty()) return 0.0;
  const std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
  const double total = at::stack(norms).to(at::kDouble).square().sum().sqrt().item<double>();
  if (max_norm > 0 && total > max_norm) at::_foreach_mul_(grads, max_norm / (total + 1e-6));
  return total;
}

}  // namespace fmoe::trainer
