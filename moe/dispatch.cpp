#include "moe/dispatch.h"

#include <ATen/ATen.h>

namespace fmoe::moe {

DispatchPlan make_dispatch_plan(const at::Tensor& experts_TK, int64_t num_experts) {
  DispatchPlan plan;
  const int64_t k = experts_TK.size(1);
  const at::Tensor flat = experts_TK.reshape({-1});
  plan.sorted_slots_S = std::get<1>(flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  plan.source_tokens_S = plan.sorted_slots_S.div(k, "floor");
  plan.tokens_per_expert_E = at::bincount(flat, {}, num_experts);
  const at::Tensor counts = plan.tokens_per_expert_E.contiguous();
  const int64_t* data = counts.data_ptr<int64_t>();
  plan.rows_per_expert.assign(data, data + num_experts);
  return plan;
}

at::Tensor permute_tokens(const at::Tensor& x_TD, const DispatchPlan& plan) {
  return x_TD.index_select(0, plan.source_tokens_S);
}

at::Tensor unpermute_and_combine(const at::Tensor& y_SD, const at::Tensor& probs_TK, const DispatchPlan& plan) {
  const int64_t tokens = probs_TK.size(0);
  const at::Tensor weights_S = probs_TK.reshape({-1}).index_select(0, plan.sorted_slots_S).unsqueeze(1);
  const at::Tensor weighted = y_SD.to(at::kFloat) * weights_S;
  return at::zeros({tokens, y_SD.size(1)}, weighted.options()).index_add(0, plan.source_tokens_S, weighted);
}

}  // namespace fmoe::moe
