#include "parallel/grad_sync.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace fmoe::parallel {

GradientSync::GradientSync(std::vector<at::Tensor> dense, std::vector<at::Tensor> experts, const Mesh& mesh, int64_t bucket_bytes)
    : mesh_(&mesh) {
  const auto fill = [&](const std::vector<at::Tensor>& params, bool expert) {
    Bucket bucket;
    bucket.expert = expert;
    // Reverse order: backward produces the last layers' gradients first.
    for (auto it = params.rbegin(); it != params.rend(); ++it) {
      const at::Tensor& p = *it;
      if (bucket.numel > 0 && (bucket.numel + p.numel()) * 4 > bucket_bytes) {
        buckets_.push_back(std::move(bucket));
        bucket = Bucket{};
        bucket.expert = expert;
      }
      bucket.params.push_back(p);
      bucket.offsets.push_back(bucket.numel);
      bucket.numel += p.numel();
    }
    if (bucket.numel > 0) buckets_.push_back(std::move(bucket));
  };
  fill(dense, false);
  fill(experts, true);
  for (Bucket& b : buckets_) b.filled.assign(b.params.size(), false);
}

GradientSync::~GradientSync() {
  for (auto& [param, handle] : hooks_) param.remove_hook(handle);
}

void GradientSync::enable_overlap(const std::vector<at::Tensor>& deferred) {
  if (overlap_ || mesh_->shape().dp == 1) return;
  overlap_ = true;
  for (size_t b = 0; b < buckets_.size(); ++b) {
    for (size_t i = 0; i < buckets_[b].params.size(); ++i) {
      at::Tensor param = buckets_[b].params[i];
      const bool later = std::any_of(deferred.begin(), deferred.end(), [&](const at::Tensor& d) { return d.is_same(param); });
      if (later) continue;
      const unsigned handle = param.register_hook([this, b, i](const at::Tensor& grad) { on_gradient(b, i, grad); });
      hooks_.emplace_back(param, handle);
    }
  }
}

void GradientSync::on_gradient(size_t b, size_t i, const at::Tensor& grad) {
  // Undefined: a node deferred this weight's gradient (moe/weight_grad.h); it arrives later.
  if (!armed_ || !grad.defined()) return;
  Bucket& bucket = buckets_[b];
  if (bucket.work || bucket.filled[i]) return;
  if (!bucket.flat.defined()) bucket.flat = at::empty({bucket.numel}, bucket.params.front().options().dtype(at::kFloat));
  // The step's gradient is what earlier micro-batches accumulated plus this one.
  const at::Tensor& param = bucket.params[i];
  at::Tensor slot = bucket.flat.narrow(0, bucket.offsets[i], param.numel());
  slot.copy_(grad.reshape({-1}));
  if (param.grad().defined()) slot.add_(param.grad().reshape({-1}));
  bucket.filled[i] = true;
  if (++bucket.ready == static_cast<int64_t>(bucket.params.size())) {
    launch(bucket);
    ++launching_;
  }
}

void GradientSync::launch(Bucket& bucket) {
  Communicator& group = bucket.expert ? mesh_->edp() : mesh_->dp();
  bucket.work = group.size() > 1 ? group.all_reduce(bucket.flat, {ReduceOp::kSum}) : nullptr;
  if (!bucket.work) bucket.work = std::make_unique<CompletedWork>();
}

void GradientSync::sync() {
  const Mesh& mesh = *mesh_;
  const int64_t dp = mesh.shape().dp;
  armed_ = false;
  launched_in_backward_ = launching_;
  launching_ = 0;
  if (dp == 1) return;
  // Buckets backward did not complete, in bucket order (the same on every rank).
  for (Bucket& bucket : buckets_) {
    if (bucket.work) continue;
    if (!bucket.flat.defined()) bucket.flat = at::empty({bucket.numel}, bucket.params.front().options().dtype(at::kFloat));
    for (size_t i = 0; i < bucket.params.size(); ++i) {
      if (bucket.filled[i]) continue;
      const at::Tensor& p = bucket.params[i];
      at::Tensor slot = bucket.flat.narrow(0, bucket.offsets[i], p.numel());
      if (p.grad().defined()) {
        slot.copy_(p.grad().reshape({-1}));
      } else {
        slot.zero_();
      }
    }
    launch(bucket);
  }
  for (Bucket& bucket : buckets_) {
    bucket.work->wait();
    bucket.flat.div_(static_cast<double>(dp));
    for (size_t i = 0; i < bucket.params.size(); ++i) {
      at::Tensor p = bucket.params[i];
      const at::Tensor piece = bucket.flat.narrow(0, bucket.offsets[i], p.numel()).view_as(p);
      if (p.grad().defined()) {
        p.mutable_grad().copy_(piece);
      } else {
        p.mutable_grad() = piece.to(p.scalar_type()).clone();
      }
    }
    bucket.work.reset();
    bucket.ready = 0;
    std::fill(bucket.filled.begin(), bucket.filled.end(), false);
  }
}

void sum_partial_gradients_over_tp(const std::vector<at::Tensor>& params, const Mesh& mesh) {
  if (params.empty() || mesh.shape().tp == 1) return;
  std::vector<at::Tensor> pieces;
  for (const at::Tensor& p : params) pieces.push_back(p.grad().reshape({-1}).to(at::kFloat));
  at::Tensor flat = at::cat(pieces);
  mesh.tp().all_reduce(flat, {ReduceOp::kSum})->wait();
  int64_t offset = 0;
  for (const at::Tensor& p : params) {
    p.grad().copy_(flat.narrow(0, offset, p.numel()).view_as(p));
    offset += p.numel();
  }
}

at::Tensor global_grad_square_sum(const std::vector<at::Tensor>& grads, const std::vector<bool>& sharded_over_tp,
                                  const std::vector<bool>& expert, const Mesh& mesh, const std::vector<bool>* owned) {
  // [replicated, tp-sharded dense, expert], accumulated as tensors on the gradients' device.
  at::TensorOptions options = at::TensorOptions().dtype(at::kDouble);
  for (const at::Tensor& g : grads) {
    if (g.defined()) {
      options = options.device(g.device());
      break;
    }
  }
  at::Tensor sums = at::zeros({3}, options);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined() || (owned && !(*owned)[i])) continue;
    const int64_t slot = expert[i] ? 2 : (sharded_over_tp[i] ? 1 : 0);
    sums[slot] += grads[i].to(at::kDouble).square().sum();
  }
  if (owned) {
    // ZeRO-1: each gradient lives on one rank of its data-parallel group.
    at::Tensor dense = sums.narrow(0, 0, 2);
    at::Tensor experts = sums.narrow(0, 2, 1);
    if (mesh.dp().size() > 1) mesh.dp().all_reduce(dense, {ReduceOp::kSum})->wait();
    if (mesh.edp().size() > 1) mesh.edp().all_reduce(experts, {ReduceOp::kSum})->wait();
  }
  // Expert shards differ over ep and (split) over tp; dense tp shards over tp only.
  at::Tensor tp_part = sums.narrow(0, 1, 2);
  if (mesh.shape().tp > 1) mesh.tp().all_reduce(tp_part, {ReduceOp::kSum})->wait();
  at::Tensor expert_part = sums.narrow(0, 2, 1);
  if (mesh.shape().ep > 1) mesh.ep().all_reduce(expert_part, {ReduceOp::kSum})->wait();
  // Pipeline stages hold different parameters: their sums add up.
  if (mesh.shape().pp > 1) mesh.pp().all_reduce(sums, {ReduceOp::kSum})->wait();
  return sums.sum();
}

}  // namespace fmoe::parallel
