// Token permutation for grouped expert compute, as pure index arithmetic.
// One stable sort of the flattened (token, k) assignments groups rows by expert;
// the same plan scatters expert outputs back, weighted by probs. No loop over
// tokens and no dense tokens x experts one-hot.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fmoe::moe {

struct DispatchPlan {
  at::Tensor sorted_slots_S;      // int64 [T*K]: flat (token * K + k) slots, grouped by expert
  at::Tensor source_tokens_S;     // int64 [T*K]: the token each sorted row comes from
  at::Tensor tokens_per_expert_E; // int64 [E]
  std::vector<int64_t> rows_per_expert;  // the same counts on the host, for the grouped GEMMs
};

DispatchPlan make_dispatch_plan(const at::Tensor& experts_TK, int64_t num_experts);

// x_TD -> x_SD: each token's row repeated once per chosen expert, grouped by expert.
at::Tensor permute_tokens(const at::Tensor& x_TD, const DispatchPlan& plan);

// y_SD (expert outputs in sorted order) -> out_TD = sum_k probs[t, k] * y[row of (t, k)], in fp32.
at::Tensor unpermute_and_combine(const at::Tensor& y_SD, const at::Tensor& probs_TK, const DispatchPlan& plan);

}  // namespace fmoe::moe
