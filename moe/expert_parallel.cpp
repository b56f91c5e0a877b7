#include "moe/expert_parallel.h"

#include <ATen/ATen.h>

#include "moe/dispatch.h"
#include "parallel/autograd.h"

namespace fmoe::moe {

at::Tensor expert_major_order(const at::Tensor& counts_SE) {
  const at::Tensor counts = counts_SE.to(at::kCPU).to(at::kLong).contiguous();
  const int64_t sources = counts.size(0), experts = counts.size(1);
  const int64_t* c = counts.data_ptr<int64_t>();
  // Offsets of block (s, e) in the received (source-major) layout.
  std::vector<int64_t> received(static_cast<size_t>(sources * experts));
  int64_t offset = 0;
  for (int64_t s = 0; s < sources; ++s) {
    for (int64_t e = 0; e < experts; ++e) received[static_cast<size_t>(s * experts + e)] = offset, offset += c[s * experts + e];
  }
  // Expert-major blocks: row i of block (e, s) is received row received[s, e] + i.
  std::vector<int64_t> shift, sizes;
  int64_t position = 0;
  for (int64_t e = 0; e < experts; ++e) {
    for (int64_t s = 0; s < sources; ++s) {
      shift.push_back(received[static_cast<size_t>(s * experts + e)] - position);
      sizes.push_back(c[s * experts + e]);
      position += c[s * experts + e];
    }
  }
  const at::Tensor per_row = at::repeat_interleave(at::tensor(shift, at::kLong), at::tensor(sizes, at::kLong));
  return at::arange(position, at::kLong) + per_row;
}

namespace {

std::vector<int64_t> to_vector(const at::Tensor& t) {
  const at::Tensor c = t.to(at::kCPU).to(at::kLong).contiguous();
  return {c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel()};
}

}  // namespace

at::Tensor dispatch_all_to_all(const at::Tensor& x_TD, const at::Tensor& experts_TK, const at::Tensor& probs_TK,
                               int64_t num_experts, const ExpertCompute& experts, parallel::Communicator& ep,
                               parallel::Communicator& tp, const at::Tensor& keep_TK) {
  const int64_t ranks = ep.size(), local = num_experts / ranks;
  // Local preprocess: rows grouped by global expert, so each destination's rows are
  // contiguous; dropped assignments form a last group that is never sent.
  const DispatchPlan plan = make_dispatch_plan(experts_TK, num_experts, 1, keep_TK);
  const at::Tensor x_sorted = permute_tokens(x_TD, plan);
  // Counts: [ranks, local] sent, and the same shape received (one small all-to-all).
  at::Tensor send_counts = plan.tokens_per_expert_E.reshape({ranks, local}).contiguous();
  at::Tensor recv_counts = at::empty_like(send_counts);
  ep.all_to_all(recv_counts, send_counts, {}, {}, {})->wait();
  // The one host read of the exchange (a device synchronisation on a GPU): the row splits size the buffers.
  const at::Tensor counts_host = at::cat({send_counts, recv_counts}).to(at::kCPU);
  const at::Tensor send_host = counts_host.narrow(0, 0, ranks), recv_host = counts_host.narrow(0, ranks, ranks);
  const std::vector<int64_t> input_splits = to_vector(send_host.sum(1));
  const std::vector<int64_t> output_splits = to_vector(recv_host.sum(1));
  // Communication, then the local experts over rows regrouped expert-major.
  const at::Tensor x_received = parallel::all_to_all_rows(x_sorted, output_splits, input_splits, ep);
  const at::Tensor order = expert_major_order(recv_host).to(x_TD.device());
  const at::Tensor y_expert_major = experts(x_received.index_select(0, order), to_vector(recv_host.sum(0)));
  const at::Tensor inverse = at::empty_like(order).index_put_({order}, at::arange(order.numel(), order.options()));
  // Combine: back to the source ranks, summed over tp, weighted by the routing probabilities.
  const at::Tensor y_sorted = parallel::all_to_all_rows(y_expert_major.index_select(0, inverse), input_splits, output_splits, ep);
  return unpermute_and_combine(parallel::reduce_from_group(y_sorted, tp), probs_TK, plan);
}

at::Tensor dispatch_all_gather(const at::Tensor& x_TD, const at::Tensor& experts_TK, const at::Tensor& probs_TK,
                               int64_t num_experts, const ExpertCompute& experts, parallel::Communicator& ep,
                               parallel::Communicator& tp, const at::Tensor& keep_TK) {
  const int64_t ranks = ep.size(), local = num_experts / ranks, first = ep.rank() * local;
  // Every rank's tokens and choices (ep ranks hold equally many tokens).
  const at::Tensor x_all = parallel::all_gather_along(x_TD, 0, ep, /*reduce_scatter_grad=*/true);
  const at::Tensor probs_all = parallel::all_gather_along(probs_TK, 0, ep, /*reduce_scatter_grad=*/true);
  const at::Tensor experts_all = parallel::gather_along_dim(experts_TK, 0, ep);
  // Choices of other ranks' experts (and dropped ones) form a last group that is never computed.
  at::Tensor mine = (experts_all >= first) & (experts_all < first + local);
  if (keep_TK.defined()) mine = mine & parallel::gather_along_dim(keep_TK.to(at::kByte), 0, ep).to(at::kBool);
  const DispatchPlan plan = make_dispatch_plan(experts_all - first, local, 1, mine);
  const at::Tensor y = parallel::reduce_from_group(experts(permute_tokens(x_all, plan), plan.rows_per_expert), tp);
  const at::Tensor partial = unpermute_and_combine(y, probs_all, plan);
  // Each token's output is the sum of the partial outputs of every ep rank.
  return parallel::reduce_scatter_along(partial, 0, ep);
}

}  // namespace fmoe::moe
