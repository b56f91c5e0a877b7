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
  at::Tensor tokens_per_expert_E;           // int64 [E]: real rows per expert
  std::vector<int64_t> rows_per_expert;     // padded rows per expert (host): the grouped GEMM shapes; empty when not asked for
  at::Tensor ends_E;                        // int32 [E] on the device: cumulative ends of rows_per_expert
  at::Tensor gather_index_P;                // int64 [P]: source token of each padded row; T for a padding row
  at::Tensor slot_rows_TK;                  // int64 [T, K]: the padded row holding each (token, k) assignment
  int64_t dropped_rows = 0;                 // rows of the skipped group, after every computed one
};

// Rows of each expert are padded up to a multiple of pad_multiple (1: no padding)
// so the per-expert GEMM shapes repeat from step to step and the GEMM library's
// kernel cache hits; padding rows are zeros and get zero gradient.
// keep_TK (optional, bool): assignments marked false (dropped for capacity, or
// another rank's experts) form one extra group after the last expert that is
// never computed: rows_per_expert does not list it, permute_tokens leaves it out,
// and unpermute_and_combine gives it zero output.
DispatchPlan make_dispatch_plan(const at::Tensor& experts_TK, int64_t num_experts, int64_t pad_multiple = 1,
                                const at::Tensor& keep_TK = {});

// The same plan without padding or skipped assignments, computed on experts_TK's
// device with no copy to the host: rows_per_expert stays empty and the experts
// take their groups from ends_E (a GPU step then never waits on the router).
DispatchPlan make_device_dispatch_plan(const at::Tensor& experts_TK, int64_t num_experts);

// int64 [E]: how many of experts_TK's choices name each expert, on its device
// (without the host read-back that bincount does on a GPU).
at::Tensor count_per_expert(const at::Tensor& experts_TK, int64_t num_experts);

// x_TD -> x_PD: each token's row once per chosen expert, grouped by expert, zero rows as
// padding; the rows of the computed groups only.
at::Tensor permute_tokens(const at::Tensor& x_TD, const DispatchPlan& plan);

// y_PD (expert outputs of the computed groups, padded order) -> out_TD =
// sum_k probs[t, k] * y[slot_rows[t, k]] (zero for skipped assignments), in fp32.
at::Tensor unpermute_and_combine(const at::Tensor& y_PD, const at::Tensor& probs_TK, const DispatchPlan& plan);

}  // namespace fmoe::moe
