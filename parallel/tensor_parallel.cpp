#include "parallel/tensor_parallel.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "parallel/autograd.h"

namespace fmoe::parallel {
namespace {

std::vector<int64_t> blocks_of(const ShardSpec& spec, int64_t full_size) {
  return spec.tp_blocks.empty() ? std::vector<int64_t>{full_size} : spec.tp_blocks;
}

at::Tensor split_blocks(const at::Tensor& full, const ShardSpec& spec, int64_t rank, int64_t n) {
  std::vector<at::Tensor> pieces;
  int64_t offset = 0;
  for (int64_t block : blocks_of(spec, full.size(spec.tp_dim))) {
    TORCH_CHECK(block % n == 0, "a block of ", block, " does not split over tp ", n);
    pieces.push_back(full.narrow(spec.tp_dim, offset + rank * (block / n), block / n));
    offset += block;
  }
  return at::cat(pieces, spec.tp_dim);
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class VocabParallelCrossEntropy : public torch::autograd::Function<VocabParallelCrossEntropy> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start,
                            Communicator* tp) {
    const at::Tensor x = logits.to(at::kFloat);
    const int64_t local_vocab = x.size(1);
    // Stabiliser: the global row max (no gradient flows through it).
    at::Tensor max = std::get<0>(x.max(1)).contiguous();
    tp->all_reduce(max, {ReduceOp::kMax})->wait();
    const at::Tensor shifted = x - max.unsqueeze(1);
    at::Tensor sum_exp = shifted.exp().sum(1).contiguous();
    // The target's logit lives on exactly one rank; the others add zero.
    const at::Tensor local_target = targets - vocab_start;
    const at::Tensor mine = (local_target >= 0) & (local_target < local_vocab);
    const at::Tensor index = at::where(mine, local_target, at::zeros_like(local_target));
    at::Tensor target_logit = at::where(mine, shifted.gather(1, index.unsqueeze(1)).squeeze(1), at::zeros({}, x.options())).contiguous();
    at::Tensor both = at::stack({sum_exp, target_logit});
    tp->all_reduce(both, {ReduceOp::kSum})->wait();
    const at::Tensor lse = both[0].log();
    ctx->save_for_backward({shifted, lse, index, mine});
    ctx->saved_data["dtype"] = static_cast<int64_t>(logits.scalar_type());
    return (lse - both[1]).mean();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& shifted = saved[0];
    const int64_t rows = shifted.size(0);
    // d/dlogits = (softmax - onehot) / N over this rank's columns.
    at::Tensor g = (shifted - saved[1].unsqueeze(1)).exp_();
    g.scatter_add_(1, saved[2].unsqueeze(1), -saved[3].to(at::kFloat).unsqueeze(1));
    g.mul_(grad[0] / static_cast<double>(rows));
    return {g.to(static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt())), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor local_shard(const at::Tensor& full, const ShardSpec& spec, const MeshShape& shape, const MeshCoords& coords) {
  at::Tensor t = full;
  if (spec.ep_dim >= 0 && shape.ep > 1) {
    TORCH_CHECK(t.size(spec.ep_dim) % shape.ep == 0, "experts do not split over ep ", shape.ep);
    const int64_t part = t.size(spec.ep_dim) / shape.ep;
    t = t.narrow(spec.ep_dim, coords.ep * part, part);
  }
  if (spec.tp_dim >= 0 && shape.tp > 1) t = split_blocks(t, spec, coords.tp, shape.tp);
  return t.contiguous();
}

at::Tensor gather_full(const at::Tensor& local, const ShardSpec& spec, const Mesh& mesh) {
  at::Tensor t = local.detach();
  const int64_t tp = mesh.shape().tp;
  if (spec.tp_dim >= 0 && tp > 1) {
    // Rank-major pieces along tp_dim, then each fused block reassembled from its tp slices.
    const at::Tensor stacked = gather_along_dim(t.unsqueeze(0), 0, mesh.tp());  // [tp, ...local]
    std::vector<at::Tensor> blocks;
    int64_t offset = 0;
    for (int64_t block : blocks_of(spec, t.size(spec.tp_dim) * tp)) {
      const int64_t part = block / tp;
      std::vector<at::Tensor> slices;
      for (int64_t r = 0; r < tp; ++r) slices.push_back(stacked[r].narrow(spec.tp_dim, offset, part));
      blocks.push_back(at::cat(slices, spec.tp_dim));
      offset += part;
    }
    t = at::cat(blocks, spec.tp_dim);
  }
  if (spec.ep_dim >= 0 && mesh.shape().ep > 1) t = gather_along_dim(t, spec.ep_dim, mesh.ep());
  return t.contiguous();
}

at::Tensor vocab_parallel_embedding(const at::Tensor& tokens, const at::Tensor& weight_local, int64_t vocab_start, Communicator& tp,
                                    bool scatter_tokens) {
  if (tp.size() == 1) return weight_local.index_select(0, tokens);
  const int64_t rows = weight_local.size(0);
  const at::Tensor local = tokens - vocab_start;
  const at::Tensor mine = (local >= 0) & (local < rows);
  const at::Tensor picked = weight_local.index_select(0, at::where(mine, local, at::zeros_like(local)));
  const at::Tensor partial = picked * mine.unsqueeze(1).to(picked.scalar_type());
  return scatter_tokens ? reduce_scatter_along(partial, 0, tp) : reduce_from_group(partial, tp);
}

at::Tensor vocab_parallel_cross_entropy(const at::Tensor& logits_local, const at::Tensor& targets, int64_t vocab_start, Communicator& tp) {
  return VocabParallelCrossEntropy::apply(logits_local, targets, vocab_start, &tp);
}

}  // namespace fmoe::parallel
