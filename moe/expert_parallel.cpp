#include "moe/expert_parallel.h"

#include <ATen/ATen.h>

#include <algorithm>

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

namespace {

// One chunk of tokens through the all-to-all dispatcher, in the stages the
// overlapped schedule interleaves.
struct Chunk {
  DispatchPlan plan;
  at::Tensor probs_TK, recv_host;
  std::vector<int64_t> input_splits, output_splits;
  parallel::RowsInFlight dispatched, combined;
};

// Local preprocess of every chunk, and one count exchange for all of them: what
// sizes the row exchanges.
std::vector<Chunk> plan_chunks(const std::vector<at::Tensor>& experts_TK, const std::vector<at::Tensor>& probs_TK,
                               const std::vector<at::Tensor>& keep_TK, int64_t num_experts, parallel::Communicator& ep) {
  const int64_t ranks = ep.size(), local = num_experts / ranks, chunks = static_cast<int64_t>(experts_TK.size());
  std::vector<Chunk> parts(experts_TK.size());
  std::vector<at::Tensor> counts;
  for (size_t i = 0; i < parts.size(); ++i) {
    parts[i].probs_TK = probs_TK[i];
    // Rows grouped by global expert, so each destination's rows are contiguous;
    // dropped assignments form a last group that is never sent.
    parts[i].plan = make_dispatch_plan(experts_TK[i], num_experts, 1, keep_TK[i]);
    counts.push_back(parts[i].plan.tokens_per_expert_E.reshape({ranks, local}));
  }
  // Counts: [ranks, chunks, local] sent, the same shape received (one small all-to-all).
  at::Tensor send_counts = at::stack(counts, 1).contiguous();
  at::Tensor recv_counts = at::empty_like(send_counts);
  ep.all_to_all(recv_counts, send_counts, {}, {}, {})->wait();
  // The one host read of the exchange (a device synchronisation on a GPU): the row splits size the buffers.
  const at::Tensor counts_host = at::cat({send_counts, recv_counts}).to(at::kCPU);
  for (int64_t i = 0; i < chunks; ++i) {
    Chunk& c = parts[static_cast<size_t>(i)];
    c.recv_host = counts_host.narrow(0, ranks, ranks).select(1, i).contiguous();
    c.input_splits = to_vector(counts_host.narrow(0, 0, ranks).select(1, i).sum(1));
    c.output_splits = to_vector(c.recv_host.sum(1));
  }
  return parts;
}

// The local experts over the received rows, regrouped expert-major and back.
at::Tensor run_experts(const Chunk& c, const at::Tensor& x_received, const ExpertCompute& experts) {
  const at::Tensor order = expert_major_order(c.recv_host).to(x_received.device());
  const at::Tensor y_expert_major = experts(x_received.index_select(0, order), to_vector(c.recv_host.sum(0)));
  const at::Tensor inverse = at::empty_like(order).index_put_({order}, at::arange(order.numel(), order.options()));
  return y_expert_major.index_select(0, inverse);
}

}  // namespace

at::Tensor dispatch_all_to_all(const at::Tensor& x_TD, const at::Tensor& experts_TK, const at::Tensor& probs_TK,
                               int64_t num_experts, const ExpertCompute& experts, parallel::Communicator& ep,
                               parallel::Communicator& tp, const at::Tensor& keep_TK, int64_t chunks) {
  const int64_t tokens = x_TD.size(0);
  chunks = std::max<int64_t>(1, std::min(chunks, tokens));
  // Token ranges [first, first + count) of equal size (the first ones one larger).
  std::vector<int64_t> first, count;
  for (int64_t i = 0, at_token = 0; i < chunks; ++i) {
    const int64_t n = tokens / chunks + (i < tokens % chunks ? 1 : 0);
    first.push_back(at_token);
    count.push_back(n);
    at_token += n;
  }
  const auto rows_of = [&](const at::Tensor& t, int64_t i) { return chunks == 1 ? t : t.narrow(0, first[i], count[i]); };
  std::vector<at::Tensor> chunk_experts, chunk_probs, chunk_keep;
  for (int64_t i = 0; i < chunks; ++i) {
    chunk_experts.push_back(rows_of(experts_TK, i));
    chunk_probs.push_back(rows_of(probs_TK, i));
    chunk_keep.push_back(keep_TK.defined() ? rows_of(keep_TK, i) : at::Tensor());
  }
  std::vector<Chunk> parts = plan_chunks(chunk_experts, chunk_probs, chunk_keep, num_experts, ep);
  // Every chunk's dispatch goes out at once; chunk i's experts then compute while
  // the later chunks' rows travel and the earlier chunks' outputs return.
  for (int64_t i = 0; i < chunks; ++i) {
    Chunk& c = parts[static_cast<size_t>(i)];
    c.dispatched = parallel::start_all_to_all_rows(permute_tokens(rows_of(x_TD, i), c.plan), c.output_splits, c.input_splits, ep);
  }
  for (Chunk& c : parts) {
    const at::Tensor y = run_experts(c, parallel::finish_all_to_all_rows(c.dispatched), experts);
    c.combined = parallel::start_all_to_all_rows(y, c.input_splits, c.output_splits, ep);
  }
  // Combine: back on the source ranks, summed over tp, weighted by the routing probabilities.
  std::vector<at::Tensor> outputs;
  for (Chunk& c : parts) {
    const at::Tensor y_sorted = parallel::finish_all_to_all_rows(c.combined);
    outputs.push_back(unpermute_and_combine(parallel::reduce_from_group(y_sorted, tp), c.probs_TK, c.plan));
  }
  return chunks == 1 ? outputs[0] : at::cat(outputs);
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
