#include "moe/dispatch.h"

#include <ATen/ATen.h>

namespace fmoe::moe {

DispatchPlan make_dispatch_plan(const at::Tensor& experts_TK_in, int64_t num_experts_in, int64_t pad_multiple,
                                const at::Tensor& keep_TK) {
  // Skipped assignments become one more group, the last, taken off the computed ones below.
  const bool skipping = keep_TK.defined();
  const at::Tensor experts_TK =
      skipping ? at::where(keep_TK, experts_TK_in, at::full({}, num_experts_in, experts_TK_in.options())) : experts_TK_in;
  const at::TensorOptions index = experts_TK_in.options().dtype(at::kLong);
  const int64_t num_experts = num_experts_in + (skipping ? 1 : 0);
  DispatchPlan plan;
  const int64_t tokens = experts_TK.size(0);
  const int64_t k = experts_TK.size(1);
  const at::Tensor flat = experts_TK.reshape({-1});
  // One stable sort groups the (token, k) slots by expert.
  const at::Tensor sorted_slots = std::get<1>(flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  plan.tokens_per_expert_E = at::bincount(flat, {}, num_experts);

  // The host needs the counts here (a device synchronisation on a GPU): the padded shapes depend on them.
  const at::Tensor counts = plan.tokens_per_expert_E.to(at::kCPU).contiguous();
  const int64_t* count = counts.data_ptr<int64_t>();
  std::vector<int64_t> real_offset(static_cast<size_t>(num_experts) + 1, 0), padded_offset(real_offset);
  plan.rows_per_expert.resize(static_cast<size_t>(num_experts));
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t padded = (count[e] + pad_multiple - 1) / pad_multiple * pad_multiple;
    plan.rows_per_expert[static_cast<size_t>(e)] = padded;
    real_offset[static_cast<size_t>(e) + 1] = real_offset[static_cast<size_t>(e)] + count[e];
    padded_offset[static_cast<size_t>(e) + 1] = padded_offset[static_cast<size_t>(e)] + padded;
  }
  // Sorted position i of expert e lands at padded row i + (padded_offset[e] - real_offset[e]).
  std::vector<int64_t> shift(static_cast<size_t>(num_experts));
  for (size_t e = 0; e < shift.size(); ++e) shift[e] = padded_offset[e] - real_offset[e];
  const at::Tensor shift_E = at::tensor(shift, at::kLong).to(index.device());
  const at::Tensor sorted_experts = flat.index_select(0, sorted_slots);
  const at::Tensor padded_rows_S = at::arange(flat.numel(), index) + shift_E.index_select(0, sorted_experts);

  plan.gather_index_P = at::full({padded_offset.back()}, tokens, index);
  plan.gather_index_P.index_put_({padded_rows_S}, sorted_slots.div(k, "floor"));
  plan.slot_rows_TK = at::empty({flat.numel()}, index).index_put_({sorted_slots}, padded_rows_S).view({tokens, k});
  if (skipping) {
    plan.dropped_rows = plan.rows_per_expert.back();
    plan.rows_per_expert.pop_back();
    plan.tokens_per_expert_E = plan.tokens_per_expert_E.narrow(0, 0, num_experts_in);
  }
  std::vector<int32_t> ends(plan.rows_per_expert.size());
  for (size_t e = 0; e < ends.size(); ++e) ends[e] = static_cast<int32_t>(padded_offset[e + 1]);
  plan.ends_E = at::tensor(ends, at::kInt).to(index.device());
  return plan;
}

namespace {

// Where each expert's rows start in sorted choices (and where the last ends), by
// binary search: no atomics (deterministic) and no read-back to the host.
at::Tensor expert_bounds(const at::Tensor& sorted_experts, int64_t num_experts) {
  return at::searchsorted(sorted_experts, at::arange(num_experts + 1, sorted_experts.options().dtype(at::kLong)));
}

at::Tensor counts_from_bounds(const at::Tensor& bounds, int64_t num_experts) {
  return bounds.narrow(0, 1, num_experts) - bounds.narrow(0, 0, num_experts);
}

}  // namespace

at::Tensor count_per_expert(const at::Tensor& experts_TK, int64_t num_experts) {
  const at::Tensor flat = experts_TK.reshape({-1});
  if (flat.device().is_cpu()) return at::bincount(flat, {}, num_experts);
  // bincount on a GPU reads the largest index back to size its output.
  return counts_from_bounds(expert_bounds(std::get<0>(flat.sort()), num_experts), num_experts);
}

DispatchPlan make_device_dispatch_plan(const at::Tensor& experts_TK, int64_t num_experts) {
  const int64_t tokens = experts_TK.size(0), k = experts_TK.size(1);
  const at::TensorOptions index = experts_TK.options().dtype(at::kLong);
  DispatchPlan plan;
  const at::Tensor flat = experts_TK.reshape({-1});
  const at::Tensor sorted_slots = std::get<1>(flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
  const at::Tensor bounds = expert_bounds(flat.index_select(0, sorted_slots), num_experts);
  plan.tokens_per_expert_E = counts_from_bounds(bounds, num_experts);
  plan.ends_E = bounds.narrow(0, 1, num_experts).to(at::kInt);
  plan.gather_index_P = sorted_slots.div(k, "floor");
  plan.slot_rows_TK = at::empty({flat.numel()}, index).index_put_({sorted_slots}, at::arange(flat.numel(), index)).view({tokens, k});
  return plan;
}

at::Tensor permute_tokens(const at::Tensor& x_TD, const DispatchPlan& plan) {
  // Row T of the extended input is the zero row that padding rows gather.
  if (plan.rows_per_expert.empty()) return x_TD.index_select(0, plan.gather_index_P);  // a device plan: no padding rows
  const at::Tensor extended = at::cat({x_TD, at::zeros({1, x_TD.size(1)}, x_TD.options())});
  const int64_t computed = plan.gather_index_P.size(0) - plan.dropped_rows;
  return extended.index_select(0, plan.dropped_rows > 0 ? plan.gather_index_P.narrow(0, 0, computed) : plan.gather_index_P);
}

at::Tensor unpermute_and_combine(const at::Tensor& y_computed, const at::Tensor& probs_TK, const DispatchPlan& plan) {
  const int64_t tokens = probs_TK.size(0), k = probs_TK.size(1);
  const at::Tensor y_PD = plan.dropped_rows > 0
                              ? at::cat({y_computed, at::zeros({plan.dropped_rows, y_computed.size(1)}, y_computed.options())})
                              : y_computed;
  // A gather and a batched [1, K] x [K, D] product per token: no scatter, no atomics.
  const at::Tensor y_TKD = y_PD.index_select(0, plan.slot_rows_TK.reshape({-1})).view({tokens, k, y_PD.size(1)});
  return at::bmm(probs_TK.unsqueeze(1), y_TKD.to(at::kFloat)).squeeze(1);
}

}  // namespace fmoe::moe
