#include "moe/router.h"

#include <ATen/ATen.h>

#include <cmath>

#include <limits>

#include "moe/cpu_kernels.h"

namespace fmoe::moe {

RouterOptions RouterOptions::from(const ModelConfig& c) {
  return {c.score_function, c.top_k, c.num_groups, c.group_top_k, c.norm_topk_prob, c.route_scale};
}

at::Tensor group_limited_mask(const at::Tensor& selection_TE, const RouterOptions& options) {
  const int64_t tokens = selection_TE.size(0);
  const int64_t experts = selection_TE.size(1);
  const int64_t per_group = experts / options.num_groups;
  const at::Tensor grouped = selection_TE.view({tokens, options.num_groups, per_group});
  at::Tensor group_scores;
  if (options.score_function == ScoreFunction::kSigmoid) {
    group_scores = std::get<0>(grouped.topk(std::min<int64_t>(2, per_group), -1)).sum(-1);
  } else {
    group_scores = std::get<0>(grouped.max(-1));
  }
  const at::Tensor best_groups = std::get<1>(group_scores.topk(options.group_top_k, -1));
  at::Tensor group_mask = at::zeros({tokens, options.num_groups}, selection_TE.options().dtype(at::kBool)).scatter_(1, best_groups, true);
  return group_mask.unsqueeze(-1).expand({tokens, options.num_groups, per_group}).reshape({tokens, experts});
}

Routing route(const at::Tensor& logits_TE, const at::Tensor& expert_bias_E, const RouterOptions& options) {
  Routing routing;
  routing.scores_TE = options.score_function == ScoreFunction::kSigmoid ? logits_TE.sigmoid() : logits_TE.softmax(-1);
  const at::Tensor scores = routing.scores_TE.detach();
  if (scores.is_cpu() && fused_cpu_kernels_enabled() && scores.scalar_type() == at::kFloat && expert_bias_E.scalar_type() == at::kFloat && scores.dim() == 2) {
    // One pass per token: bias, group scores, the best groups and the top-k (moe/cpu_kernels.h).
    const at::Tensor s = scores.contiguous(), bias = expert_bias_E.contiguous();
    routing.experts_TK = at::empty({s.size(0), options.top_k}, s.options().dtype(at::kLong));
    cpu_kernels().route_select(s.data_ptr<float>(), bias.data_ptr<float>(), s.size(0), s.size(1), options.num_groups, options.group_top_k,
                               options.top_k, options.score_function == ScoreFunction::kSigmoid, routing.experts_TK.data_ptr<int64_t>());
  } else {
    at::Tensor selection = scores + expert_bias_E;
    if (options.group_top_k < options.num_groups) {
      selection = selection.masked_fill(group_limited_mask(selection, options).logical_not(), -std::numeric_limits<float>::infinity());
    }
    routing.experts_TK = std::get<1>(selection.topk(options.top_k, -1));
  }
  at::Tensor probs = routing.scores_TE.gather(1, routing.experts_TK);
  if (options.norm_topk_prob) probs = probs / (probs.sum(-1, true) + 1e-20);
  routing.probs_TK = options.route_scale == 1.0 ? probs : probs * options.route_scale;
  return routing;
}

at::Tensor sequence_balance_loss(const at::Tensor& scores_TE, const at::Tensor& experts_TK, int64_t num_sequences) {
  const int64_t tokens = scores_TE.size(0);
  const int64_t experts = scores_TE.size(1);
  const int64_t k = experts_TK.size(1);
  const int64_t seq_len = tokens / num_sequences;
  const at::Tensor picks = experts_TK.reshape({num_sequences, seq_len * k});
  const at::Tensor counts = at::zeros({num_sequences, experts}, scores_TE.options())
                                .scatter_add_(1, picks, at::ones(picks.sizes(), scores_TE.options()));
  const at::Tensor f = counts * (static_cast<double>(experts) / static_cast<double>(k * seq_len));
  const at::Tensor normalised = scores_TE / (scores_TE.sum(-1, true) + 1e-20);
  const at::Tensor p = normalised.view({num_sequences, seq_len, experts}).mean(1);
  return (f * p).sum(1).mean();
}

at::Tensor capacity_mask(const at::Tensor& experts_TK, const at::Tensor& probs_TK, int64_t num_experts, int64_t capacity) {
  const at::Tensor experts = experts_TK.reshape({-1});
  const at::Tensor probs = probs_TK.detach().reshape({-1}).to(at::kDouble);
  // Order assignments by (expert, probability descending, position): one stable sort on a
  // key where the expert dominates; then each one's rank inside its expert.
  const at::Tensor order_by_prob = std::get<1>(probs.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  const at::Tensor by_expert = std::get<1>(experts.index_select(0, order_by_prob).sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor order = order_by_prob.index_select(0, by_expert);
  const at::Tensor sorted_experts = experts.index_select(0, order);
  const at::Tensor counts = at::bincount(experts, {}, num_experts);
  const at::Tensor starts = counts.cumsum(0) - counts;
  const at::Tensor rank_in_expert = at::arange(experts.numel(), experts.options()) - starts.index_select(0, sorted_experts);
  at::Tensor keep = at::empty({experts.numel()}, experts.options().dtype(at::kBool));
  keep.index_put_({order}, rank_in_expert < capacity);
  return keep.view(experts_TK.sizes());
}

int64_t expert_capacity(double capacity_factor, int64_t tokens, int64_t top_k, int64_t num_experts) {
  return static_cast<int64_t>(std::ceil(capacity_factor * static_cast<double>(tokens * top_k) / static_cast<double>(num_experts)));
}

at::Tensor router_z_loss(const at::Tensor& logits_TE) { return logits_TE.logsumexp(-1).square().mean(); }

void update_expert_bias(at::Tensor& bias_E, const at::Tensor& load_E, double rate) {
  const at::Tensor load = load_E.to(at::kFloat);
  bias_E.add_((load.mean() - load).sign() * rate);
}

}  // namespace fmoe::moe
