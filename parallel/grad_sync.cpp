#include "parallel/grad_sync.h"

#include <ATen/ATen.h>

namespace fmoe::parallel {

GradientSync::GradientSync(std::vector<at::Tensor> dense, std::vector<at::Tensor> experts, const Mesh& mesh, int64_t bucket_bytes)
    : mesh_(&mesh) {
  const auto fill = [&](const std::vector<at::Tensor>& params, bool expert) {
    Bucket bucket;
    bucket.expert = expert;
    for (const at::Tensor& p : params) {
      if (bucket.numel > 0 && (bucket.numel + p.numel()) * 4 > bucket_bytes) {
        buckets_.push_back(std::move(bucket));
        bucket = Bucket{};
        bucket.expert = expert;
      }
      bucket.params.push_back(p);
      bucket.numel += p.numel();
    }
    if (bucket.numel > 0) buckets_.push_back(std::move(bucket));
  };
  fill(dense, false);
  fill(experts, true);
}

void GradientSync::sync() {
  const Mesh& mesh = *mesh_;
  const int64_t dp = mesh.shape().dp;
  if (dp == 1) return;
  std::vector<at::Tensor> flats;
  std::vector<std::unique_ptr<Work>> works;
  for (const Bucket& bucket : buckets_) {
    Communicator& group = bucket.expert ? mesh.edp() : mesh.dp();
    std::vector<at::Tensor> pieces;
    for (const at::Tensor& p : bucket.params) {
      pieces.push_back(p.grad().defined() ? p.grad().reshape({-1}).to(at::kFloat) : at::zeros({p.numel()}, at::kFloat));
    }
    flats.push_back(at::cat(pieces));
    works.push_back(group.size() > 1 ? group.all_reduce(flats.back(), {ReduceOp::kSum}) : nullptr);
  }
  for (size_t b = 0; b < buckets_.size(); ++b) {
    if (works[b]) works[b]->wait();
    flats[b].div_(static_cast<double>(dp));
    int64_t offset = 0;
    for (const at::Tensor& p : buckets_[b].params) {
      const at::Tensor piece = flats[b].narrow(0, offset, p.numel()).view_as(p);
      if (p.grad().defined()) {
        p.mutable_grad().copy_(piece);
      } else {
        p.mutable_grad() = piece.to(p.scalar_type()).clone();
      }
      offset += p.numel();
    }
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

double global_grad_square_sum(const std::vector<at::Tensor>& grads, const std::vector<bool>& sharded_over_tp,
                              const std::vector<bool>& expert, const Mesh& mesh) {
  // [replicated, tp-sharded dense, expert]
  at::Tensor sums = at::zeros({3}, at::kDouble);
  for (size_t i = 0; i < grads.size(); ++i) {
    if (!grads[i].defined()) continue;
    const double s = grads[i].to(at::kDouble).square().sum().item<double>();
    const int64_t slot = expert[i] ? 2 : (sharded_over_tp[i] ? 1 : 0);
    sums[slot] += s;
  }
  // Expert shards differ over ep and (split) over tp; dense tp shards over tp only.
  at::Tensor tp_part = sums.narrow(0, 1, 2).contiguous();
  if (mesh.shape().tp > 1) mesh.tp().all_reduce(tp_part, {ReduceOp::kSum})->wait();
  at::Tensor expert_part = tp_part.narrow(0, 1, 1).contiguous();
  if (mesh.shape().ep > 1) mesh.ep().all_reduce(expert_part, {ReduceOp::kSum})->wait();
  return sums[0].item<double>() + tp_part[0].item<double>() + expert_part[0].item<double>();
}

}  // namespace fmoe::parallel
