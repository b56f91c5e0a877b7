// Routing as pure functions on tensors (Megatron's vocabulary): router logits ->
// scores (softmax or sigmoid) -> top-k selection on scores + expert bias, limited
// to the best groups -> probs (the combine weights). The bias steers selection
// only; probs come from the unbiased scores, as in DeepSeek-V3.
#pragma once

#include <ATen/core/Tensor.h>

#include "moe/model_config.h"

namespace fmoe::moe {

struct RouterOptions {
  ScoreFunction score_function = ScoreFunction::kSigmoid;
  int64_t top_k = 2;
  int64_t num_groups = 1;
  int64_t group_top_k = 1;
  bool norm_topk_prob = true;
  double route_scale = 1.0;

  static RouterOptions from(const ModelConfig& config);
};

struct Routing {
  at::Tensor scores_TE;        // fp32, differentiable
  at::Tensor probs_TK;         // fp32 combine weights, differentiable
  at::Tensor experts_TK;       // int64 expert ids
};

// logits_TE: fp32 [tokens, experts]; expert_bias_E: fp32 [experts] (selection only).
Routing route(const at::Tensor& logits_TE, const at::Tensor& expert_bias_E, const RouterOptions& options);

// Boolean [tokens, experts]: true for experts in each token's group_top_k best
// groups. A group's score is the sum of its top-2 selection scores for sigmoid
// routing (DeepSeek-V3) and its best score for softmax routing (DeepSeek-V2).
at::Tensor group_limited_mask(const at::Tensor& selection_TE, const RouterOptions& options);

// Token dropping: which (token, k) assignments fit their expert's capacity, the
// highest-probability ones first (ties: earlier token first). Boolean [T, K].
at::Tensor capacity_mask(const at::Tensor& experts_TK, const at::Tensor& probs_TK, int64_t num_experts, int64_t capacity);
// ceil(capacity_factor * tokens * top_k / num_experts).
int64_t expert_capacity(double capacity_factor, int64_t tokens, int64_t top_k, int64_t num_experts);

// DeepSeek-V3's sequence-wise balance loss: mean over sequences of
// sum_e f_e * P_e, with f_e = E / (K * T) * (tokens of the sequence routed to e)
// and P_e the sequence mean of the token-normalised scores. Without the coefficient.
at::Tensor sequence_balance_loss(const at::Tensor& scores_TE, const at::Tensor& experts_TK, int64_t num_sequences);

// Router z-loss: mean over tokens of logsumexp(logits)^2. Without the coefficient.
at::Tensor router_z_loss(const at::Tensor& logits_TE);

// Aux-loss-free balancing: bias_E += rate * sign(mean(load) - load_E), in place.
void update_expert_bias(at::Tensor& bias_E, const at::Tensor& load_E, double rate);

}  // namespace fmoe::moe
