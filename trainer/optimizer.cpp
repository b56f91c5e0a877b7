#include "trainer/optimizer.h"

#include "parallel/grad_sync.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numbers>
#include <stdexcept>

namespace fmoe::trainer {

using config::OptimizerConfig;
using checkpoint::TensorMap;

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

std::string StateBytes::format() const {
  char text[320];
  std::snprintf(text, sizeof(text),
                "weights %.2f | master %.2f | grads %.2f | exp_avg %.2f | exp_avg_sq %.2f | training state %.2f B/param",
                weights, master, grads, exp_avg, exp_avg_sq, training_state());
  return text;
}

moe::WeightMatrices muon_matrices(const std::string& name, at::IntArrayRef shape, const OptimizerConfig& config,
                                  const moe::ModelConfig* model) {
  return config.muon() ? moe::weight_matrices(name, shape, model) : moe::WeightMatrices{};
}

at::Tensor newton_schulz(const at::Tensor& G, int64_t steps, at::ScalarType dtype) {
  constexpr double a = 3.4445, b = -4.7750, c = 2.0315;
  const at::Tensor g = G.to(at::kFloat);
  at::Tensor X = (g / (g.square().sum({-2, -1}, /*keepdim=*/true).sqrt() + 1e-7)).to(dtype);
  const bool tall = X.size(-2) > X.size(-1);
  if (tall) X = X.transpose(-2, -1);  // A = X X^T on the smaller side
  X = X.contiguous();
  for (int64_t k = 0; k < steps; ++k) {
    const at::Tensor A = at::bmm(X, X.transpose(-2, -1));
    const at::Tensor B = at::baddbmm(A, A, A, /*beta=*/b, /*alpha=*/c);
    X = at::baddbmm(X, B, X, /*beta=*/a, /*alpha=*/1.0);
  }
  X = X.to(at::kFloat);
  return tall ? X.transpose(-2, -1) : X;
}

Optimizer::Optimizer(std::vector<NamedParameter> parameters, const OptimizerConfig& config, const moe::ModelConfig* model)
    : params_(std::move(parameters)), config_(config), grad_dtype_(fp8::parse_storage_dtype(config.grad_dtype)) {
  model_ = model;
  const auto main_dtype = fp8::parse_storage_dtype(config.main_params_dtype);
  const auto m_dtype = fp8::parse_storage_dtype(config.exp_avg_dtype);
  const auto v_dtype = fp8::parse_storage_dtype(config.exp_avg_sq_dtype);
  all_fp32_ = main_dtype == fp8::StorageDtype::kFp32 && m_dtype == fp8::StorageDtype::kFp32 &&
              v_dtype == fp8::StorageDtype::kFp32;
  const int64_t block = config.state_block_size;
  Group decay{config.weight_decay, {}}, no_decay{0.0, {}};
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& p = params_[i].tensor;
    muon_.push_back(muon_matrices(params_[i].name, p.sizes(), config, model));
    exp_avg_.emplace_back(p.sizes(), m_dtype, block, /*sqrt_transform=*/false, p.device());
    // FP8 second moments are stored as their square root (half the dynamic range).
    if (muon_.back().matrix) {
      exp_avg_sq_.emplace_back();
    } else {
      exp_avg_sq_.emplace_back(p.sizes(), v_dtype, block, /*sqrt_transform=*/v_dtype == fp8::StorageDtype::kFp8, p.device());
    }
    if (main_dtype != fp8::StorageDtype::kFp32) {
      master_.emplace_back(p.sizes(), main_dtype, block, /*sqrt_transform=*/false, p.device());
      master_.back().store(p.detach());
      at::NoGradGuard no_grad;
      p.copy_(master_.back().load());  // the working copy starts from the rounded master
    }
    if (muon_.back().matrix) {
      muon_members_.push_back(i);
    } else {
      (decays(classify_parameter(params_[i].name), config) ? decay : no_decay).members.push_back(i);
    }
  }
  for (Group* group : {&decay, &no_decay}) {
    if (!group->members.empty()) groups_.push_back(std::move(*group));
  }
}

// The seed of a stochastic rounding of parameter i's master copy (salt 0) or
// gradient at this step: a hash of the name and the step, so a replayed step
// rounds to the same bits.
uint32_t Optimizer::rounding_seed(size_t i, uint32_t salt) const {
  uint32_t seed = 2166136261u;  // FNV-1a of the name
  for (const char ch : params_[i].name) seed = (seed ^ static_cast<unsigned char>(ch)) * 16777619u;
  return seed ^ static_cast<uint32_t>(steps_taken_ + 1) * 0x9E3779B1u ^ salt;
}

// Rounded to nearest, or stochastically with a seed of the step and the
// parameter's name: the same bits whenever the same step is replayed.
void Optimizer::store_master(size_t i, const at::Tensor& value) {
  if (!config_.stochastic_rounding) {
    master_[i].store(value);
    return;
  }
  master_[i].store_stochastic(value, rounding_seed(i, 0));
}

void Optimizer::refresh_master(const at::Tensor& param) {
  if (master_.empty()) return;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!params_[i].tensor.is_same(param)) continue;
    at::NoGradGuard no_grad;
    master_[i].store(param.detach());
    params_[i].tensor.copy_(master_[i].load());
    return;
  }
}

fp8::StorageDtype Optimizer::grad_dtype_of(size_t i) const {
  return fp8::is_fp4(grad_dtype_) && !muon_[i].matrix ? fp8::StorageDtype::kFp8 : grad_dtype_;
}

void Optimizer::quantize_gradients() {
  if (grad_dtype_ == fp8::StorageDtype::kFp32) return;
  at::NoGradGuard no_grad;
  for (size_t i = 0; i < params_.size(); ++i) {
    at::Tensor grad = params_[i].tensor.grad();
    if (!grad.defined()) continue;
    const fp8::StorageDtype dtype = grad_dtype_of(i);
    // FP4 rounds stochastically by default (unbiased: rounding to nearest would flush a wide tile's small values).
    const bool stochastic = fp8::is_fp4(dtype) && config_.grad_stochastic_rounding;
    const std::optional<uint32_t> seed = stochastic ? std::optional(rounding_seed(i, 0x85EBCA6Bu)) : std::nullopt;
    const std::optional<uint32_t> rotation = fp8::is_fp4(dtype) && config_.grad_hadamard ? std::optional(rounding_seed(i, 0x27D4EB2Fu)) : std::nullopt;
    grad.copy_(fp8::LowPrecisionTensor::round_trip(grad, dtype, config_.state_block_size, seed, rotation));
  }
}

void Optimizer::step(double lr) {
  at::NoGradGuard no_grad;
  // Under Muon the AdamW parameters follow the schedule from their own peak.
  const double adamw_lr = config_.muon() && config_.adamw_lr > 0 ? lr * config_.adamw_lr / config_.lr : lr;
  if (all_fp32_) {
    step_fused(adamw_lr);
  } else {
    const double step = static_cast<double>(steps_taken_ + 1);
    step_stored(adamw_lr, 1.0 - std::pow(config_.beta1, step), 1.0 - std::pow(config_.beta2, step));
  }
  step_muon(lr);
  ++steps_taken_;
}

void Optimizer::set_tensor_parallel(const parallel::Mesh& mesh, const std::map<std::string, parallel::ShardSpec>& specs) {
  if (mesh.shape().tp == 1) return;
  tp_spec_.assign(params_.size(), {});
  std::vector<size_t> split;
  for (size_t i : muon_members_) {
    const auto it = specs.find(params_[i].name);
    if (it == specs.end() || it->second.tp_dim < 0) continue;
    tp_spec_[i].tp_dim = it->second.tp_dim;
    tp_spec_[i].tp_blocks = it->second.tp_blocks;  // ep_dim stays -1: a rank's experts are whole on it
    // The iteration sees the gathered tensor: its matrices are the whole tensor's.
    std::vector<int64_t> whole = params_[i].tensor.sizes().vec();
    whole[static_cast<size_t>(it->second.tp_dim)] *= mesh.shape().tp;
    muon_[i] = moe::weight_matrices(params_[i].name, whole, model_);
    split.push_back(i);
  }
  if (split.empty()) return;
  tp_mesh_ = &mesh;
  // Largest first onto the tp rank with the least work so far (the same plan on every rank).
  std::stable_sort(split.begin(), split.end(), [&](size_t a, size_t b) { return params_[a].tensor.numel() > params_[b].tensor.numel(); });
  std::vector<int64_t> load(static_cast<size_t>(mesh.shape().tp), 0);
  tp_owner_.assign(params_.size(), -1);
  for (size_t i : split) {
    const auto r = static_cast<size_t>(std::min_element(load.begin(), load.end()) - load.begin());
    tp_owner_[i] = static_cast<int>(r);
    load[r] += params_[i].tensor.numel();
  }
}

// The scaled orthogonalized update of a parameter from U (FP32, its shape), split into matrices as m says.
at::Tensor Optimizer::muon_update(const at::Tensor& u, const moe::WeightMatrices& m) const {
  const bool experts = m.in_major;  // [matrices, in, out]; 2-D weights are [out, in]
  const at::Tensor u3 = experts ? u : u.unsqueeze(0);
  at::Tensor out = at::empty_like(u3);
  const int64_t dim = m.split_dim < 0 ? -1 : (experts ? m.split_dim : m.split_dim + 1);
  const std::vector<int64_t> blocks = m.blocks.empty() ? std::vector<int64_t>{u3.size(-1)} : m.blocks;
  int64_t begin = 0;
  for (const int64_t size : blocks) {
    const at::Tensor piece = u3.narrow(dim, begin, size);
    const double rows = static_cast<double>(piece.size(1)), cols = static_cast<double>(piece.size(2));
    const double fan_out = experts ? cols : rows, fan_in = experts ? rows : cols;
    const double scale = config_.muon_scale == "rms" ? 0.2 * std::sqrt(std::max(rows, cols)) : std::sqrt(std::max(1.0, fan_out / fan_in));
    out.narrow(dim, begin, size).copy_(newton_schulz(piece, config_.muon_ns_steps, matrix_dtype_).mul_(scale));
    begin += size;
  }
  return experts ? out : out.squeeze(0);
}

void Optimizer::step_muon(double lr) {
  const double mu = config_.muon_momentum;
  // Momentum and the Nesterov input U of each matrix; the orthogonalized updates.
  std::vector<at::Tensor> momenta(params_.size()), updates(params_.size());
  std::vector<size_t> split;  // split over tp: gathered, orthogonalized by an owner, broadcast back
  for (size_t i : muon_members_) {
    const at::Tensor& grad = params_[i].tensor.grad();
    if (!grad.defined()) continue;
    const at::Tensor g = grad.to(at::kFloat);
    // FP32 storage: load() is the stored momentum itself, updated in place; else a fresh decoding.
    at::Tensor momentum = exp_avg_[i].load();
    momentum.lerp_(g, 1.0 - mu);
    const at::Tensor u = config_.muon_nesterov ? g.lerp(momentum, mu) : momentum;
    momenta[i] = momentum;
    if (tp_mesh_ && tp_owner_[i] >= 0) {
      updates[i] = u;  // its shard of U, until the whole update comes back
      split.push_back(i);
    } else {
      updates[i] = muon_update(u, muon_[i]);
    }
  }
  if (!split.empty()) {
    parallel::Communicator& tp = tp_mesh_->tp();
    std::vector<at::Tensor> whole(params_.size());
    for (size_t i : split) {
      const at::Tensor full = parallel::gather_full(updates[i], tp_spec_[i], *tp_mesh_);
      whole[i] = tp_owner_[i] == tp.rank() ? muon_update(full, muon_[i]) : at::empty_like(full);
    }
    std::vector<std::unique_ptr<parallel::Work>> works;
    for (size_t i : split) works.push_back(tp.broadcast(whole[i], {tp_owner_[i]}));
    for (size_t k = 0; k < split.size(); ++k) {
      works[k]->wait();
      const size_t i = split[k];
      updates[i] = parallel::local_shard(whole[i], tp_spec_[i], tp_mesh_->shape(), tp_mesh_->coords());
    }
  }
  for (size_t i : muon_members_) {
    if (!updates[i].defined()) continue;
    at::Tensor& param = params_[i].tensor;
    at::Tensor master = master_.empty() ? param : master_[i].load();  // updated in place, stored below
    if (config_.weight_decay > 0) master.mul_(1.0 - lr * config_.weight_decay);
    master.add_(updates[i], -lr);
    exp_avg_[i].store(momenta[i]);  // FP32: momenta[i] is the stored tensor, updated in place (no copy)
    if (!master_.empty()) {
      store_master(i, master);
      param.copy_(master_[i].load());
    }
  }
}

void Optimizer::step_fused(double lr) {
  for (const Group& group : groups_) {
    std::vector<at::Tensor> p, g, m, v;
    for (size_t i : group.members) {
      const at::Tensor& grad = params_[i].tensor.grad();
      if (!grad.defined()) continue;
      p.push_back(params_[i].tensor);
      g.push_back(grad);
      m.push_back(exp_avg_[i].load());  // FP32 storage: load() is the stored tensor itself
      v.push_back(exp_avg_sq_[i].load());
    }
    if (p.empty()) continue;
    // LibTorch's fused AdamW: one pass over each tensor (moments, decoupled decay,
    // bias-corrected update) instead of eight, on the CPU and on CUDA alike. It
    // reads the step count from a tensor per parameter.
    const double step = static_cast<double>(steps_taken_ + 1);
    std::vector<at::Tensor> steps(p.size(), at::full({}, step, p.front().options().dtype(at::kFloat)));
    at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, steps, lr, config_.beta1, config_.beta2, group.weight_decay,
                      config_.eps, /*amsgrad=*/false, /*maximize=*/false);
  }
}

void Optimizer::step_stored(double lr, double bias_correction1, double bias_correction2) {
  for (const Group& group : groups_) {
    for (size_t i : group.members) {
      at::Tensor& param = params_[i].tensor;
      const at::Tensor& grad = param.grad();
      if (!grad.defined()) continue;
      // Each load() is the stored FP32 tensor itself or a fresh decoding: updated in place, stored back.
      at::Tensor m = exp_avg_[i].load();
      at::Tensor v = exp_avg_sq_[i].load();
      m.lerp_(grad, 1.0 - config_.beta1);
      v.mul_(config_.beta2).addcmul_(grad, grad, 1.0 - config_.beta2);
      at::Tensor master = master_.empty() ? param : master_[i].load();
      if (group.weight_decay > 0) master.mul_(1.0 - lr * group.weight_decay);
      master.addcdiv_(m, v.sqrt().div_(std::sqrt(bias_correction2)).add_(config_.eps), -lr / bias_correction1);
      exp_avg_[i].store(m);
      if (config_.exp_avg_sq_stochastic_rounding) {
        exp_avg_sq_[i].store_stochastic(v, rounding_seed(i, 0xC2B2AE35u));
      } else {
        exp_avg_sq_[i].store(v);
      }
      if (!master_.empty()) {
        store_master(i, master);
        param.copy_(master_[i].load());
      }
    }
  }
}

StateBytes Optimizer::bytes_per_parameter() const {
  StateBytes b;
  double numel = 0, master = 0, m = 0, v = 0, grads = 0;
  for (size_t i = 0; i < params_.size(); ++i) {
    const double n = static_cast<double>(params_[i].tensor.numel());
    numel += n;
    if (!master_.empty()) master += static_cast<double>(master_[i].bytes());
    m += static_cast<double>(exp_avg_[i].bytes());
    if (!muon_[i].matrix) v += static_cast<double>(exp_avg_sq_[i].bytes());
    const fp8::StorageDtype grad_dtype = grad_dtype_of(i);
    grads += n * fp8::storage_bytes_per_value(grad_dtype, config_.state_block_size) + (grad_dtype == fp8::StorageDtype::kNvfp4 ? 4 : 0);
  }
  if (numel == 0) return b;
  b.weights = 4;
  b.master = master / numel;
  b.exp_avg = m / numel;
  b.exp_avg_sq = v / numel;
  b.grads = grads / numel;
  return b;
}

namespace {

void add_parts(TensorMap& state, const std::string& prefix, const fp8::LowPrecisionTensor& t) {
  for (const auto& [part, tensor] : t.parts()) state[prefix + "." + part] = tensor;
}

void restore_parts(const TensorMap& state, const std::string& prefix, fp8::LowPrecisionTensor& t, const std::string& source) {
  std::map<std::string, at::Tensor> parts;
  for (const char* part : {"data", "scales"}) {
    const auto it = state.find(prefix + "." + part);
    if (it != state.end()) parts[part] = it->second;
  }
  if (parts.empty()) throw std::runtime_error(source + ": optimizer state '" + prefix + "' is missing");
  t.restore(parts, source + " (" + prefix + ")");
}

}  // namespace

TensorMap Optimizer::state() const {
  TensorMap state;
  for (size_t i = 0; i < params_.size(); ++i) {
    add_parts(state, "exp_avg." + params_[i].name, exp_avg_[i]);  // Muon: its momentum
    if (!muon_[i].matrix) add_parts(state, "exp_avg_sq." + params_[i].name, exp_avg_sq_[i]);
    if (!master_.empty()) add_parts(state, "master." + params_[i].name, master_[i]);
  }
  state["optimizer_steps"] = at::full({}, steps_taken_, at::kLong);  // a host scalar: the checkpoint reads it
  return state;
}

void Optimizer::load_state(const TensorMap& state, const std::string& source) {
  for (size_t i = 0; i < params_.size(); ++i) {
    const std::string& name = params_[i].name;
    // Muon keeps no second moment: its presence or absence tells which optimizer wrote the state.
    const bool has_second = state.count("exp_avg_sq." + name + ".data") > 0;
    if (muon_[i].matrix && has_second) {
      throw std::runtime_error(source + ": optimizer state of '" + name + "' was written by AdamW; this run's optimizer.name is muon");
    }
    if (!muon_[i].matrix && !has_second && state.count("exp_avg." + name + ".data") > 0) {
      throw std::runtime_error(source + ": optimizer state of '" + name + "' was written by Muon (no second moment); this run updates "
                               "it with AdamW (optimizer.name: " + config_.name + ")");
    }
    restore_parts(state, "exp_avg." + name, exp_avg_[i], source);
    if (!muon_[i].matrix) restore_parts(state, "exp_avg_sq." + name, exp_avg_sq_[i], source);
    if (!master_.empty()) restore_parts(state, "master." + params_[i].name, master_[i], source);
  }
  const auto steps = state.find("optimizer_steps");
  if (steps == state.end()) throw std::runtime_error(source + ": optimizer state 'optimizer_steps' is missing");
  steps_taken_ = steps->second.to(at::kCPU).item<int64_t>();
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

void scale_to_norm(const std::vector<at::Tensor>& grads, const at::Tensor& total, double max_norm) {
  if (max_norm <= 0 || grads.empty()) return;
  if (total.is_cpu()) {
    // On the CPU reading the norm is free, and skipping the pass below the limit saves one sweep over every gradient.
    const double norm = total.item<double>();
    if (norm > max_norm) at::_foreach_mul_(grads, max_norm / (norm + 1e-6));
    return;
  }
  // min(1, max_norm / norm) as a device scalar: a GPU clips without the host reading the norm
  // (below the limit the factor is exactly 1, which leaves every gradient unchanged).
  const at::Tensor factor = (max_norm / (total + 1e-6)).clamp_max(1.0).to(at::kFloat);
  at::_foreach_mul_(grads, factor);
}

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& grads, double max_norm) {
  if (grads.empty()) return at::zeros({}, at::kDouble);
  const std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
  const at::Tensor total = at::stack(norms).to(at::kDouble).square().sum().sqrt();
  scale_to_norm(grads, total, max_norm);
  return total;
}

at::Tensor clip_grad_norm(const std::vector<at::Tensor>& grads, const std::vector<bool>& sharded_over_tp,
                          const std::vector<bool>& expert, const parallel::Mesh& mesh, double max_norm) {
  if (mesh.shape().tp == 1 && mesh.shape().ep == 1 && mesh.shape().pp == 1) return clip_grad_norm(grads, max_norm);
  const at::Tensor total = parallel::global_grad_square_sum(grads, sharded_over_tp, expert, mesh).sqrt();
  scale_to_norm(grads, total, max_norm);
  return total;
}

}  // namespace fmoe::trainer
