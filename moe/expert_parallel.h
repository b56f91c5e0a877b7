// Routed experts sharded over the expert-parallel group: rank j of ep holds the
// experts [j * E_local, (j + 1) * E_local). Two dispatchers compute the same
// function:
//
//  all-to-all (the production path): sort this rank's (token, k) rows by expert
//    -> exchange per-expert counts -> all-to-all the rows to the ranks owning their
//    experts -> regroup by local expert -> grouped expert GEMMs -> the reverse
//    exchange -> weighted combine. Bytes moved per rank: the routed rows, twice.
//  all-gather (the simple reference): gather every ep rank's tokens and routing,
//    run the local experts on the rows routed to them, combine partially, and
//    reduce-scatter the outputs back to their ranks.
//
// With tensor parallelism the experts are also split over tp along their FFN
// width; the expert outputs are summed over tp before the combine, so the router
// sees full outputs and its gradients stay replicated over tp.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "parallel/communicator.h"

namespace fmoe::moe {

// Runs the local experts over rows grouped by local expert (rows_per_expert[e] rows each).
using ExpertCompute = std::function<at::Tensor(const at::Tensor& x_rows, const std::vector<int64_t>& rows_per_expert)>;

// Received rows come source-rank-major ([S, E_local] blocks, counts_SE). The
// permutation that lists them expert-major (by local expert, then source rank):
// x_expert_major = x_received.index_select(0, order). Pure index arithmetic.
at::Tensor expert_major_order(const at::Tensor& counts_SE);

// x_TD: the expert input (replicated over tp); experts_TK / probs_TK: this
// rank's routing over all num_experts; keep_TK (optional, bool): the assignments
// that fit their expert's capacity, the others are dropped before dispatch.
// Returns the FP32 combined output [T, D].
//
// chunks > 1 splits the tokens into that many consecutive chunks (DeepSeek-V3's
// micro-batch split) whose exchanges overlap compute: every chunk's dispatch is
// issued first, then each chunk's experts run while the later chunks' rows are in
// flight, and each chunk's combine returns while the next one computes; backward
// overlaps in the mirrored order. Per token the result is the same function: the
// outputs equal the unsplit ones where the expert GEMMs compute each row alike;
// the expert weight gradients are summed per chunk, so they differ by rounding.
at::Tensor dispatch_all_to_all(const at::Tensor& x_TD, const at::Tensor& experts_TK, const at::Tensor& probs_TK,
                               int64_t num_experts, const ExpertCompute& experts, parallel::Communicator& ep,
                               parallel::Communicator& tp, const at::Tensor& keep_TK = {}, int64_t chunks = 1);
at::Tensor dispatch_all_gather(const at::Tensor& x_TD, const at::Tensor& experts_TK, const at::Tensor& probs_TK,
                               int64_t num_experts, const ExpertCompute& experts, parallel::Communicator& ep,
                               parallel::Communicator& tp, const at::Tensor& keep_TK = {});

}  // namespace fmoe::moe
