// Collectives that autograd differentiates: each forward communicates over a
// group and its backward does the adjoint exchange. The communicator must
// outlive the graph (backward uses it). On a group of one each is the identity.
//
//   copy_to_group        forward identity            backward all-reduce (sum)
//   reduce_from_group    forward all-reduce (sum)    backward identity
//   all_gather_along     forward all-gather on dim   backward own slice, or reduce-scatter
//   scatter_along        forward own slice of dim    backward all-gather
//   reduce_scatter_along forward reduce-scatter dim  backward all-gather
//   all_to_all_rows      forward rows by splits      backward the reverse exchange
//
// start_all_to_all_rows / finish_all_to_all_rows split all_to_all_rows in two so
// that compute runs while the exchange is in flight, forward and backward:
//
//   forward   start issues the exchange     ... compute ...   finish waits for it
//   backward  finish's backward issues the reverse exchange    ... compute ...
//             start's backward waits for it
//
// Autograd runs ready nodes latest-created first, so a layer that starts two
// exchanges and finishes them in turn gets its backward exchanges overlapped in
// the mirrored order. The buffer start returns is only valid after finish: it
// may be used by finish alone.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "parallel/communicator.h"

namespace fmoe::parallel {

at::Tensor copy_to_group(const at::Tensor& x, Communicator& group);
at::Tensor reduce_from_group(const at::Tensor& x, Communicator& group);
// reduce_scatter_grad: the inputs were partial sums of one value (sequence
// parallelism), so their gradients are reduce-scattered rather than sliced.
at::Tensor all_gather_along(const at::Tensor& x, int64_t dim, Communicator& group, bool reduce_scatter_grad = false);
at::Tensor scatter_along(const at::Tensor& x, int64_t dim, Communicator& group);
at::Tensor reduce_scatter_along(const at::Tensor& x, int64_t dim, Communicator& group);
// output_splits[r] rows arrive from rank r; input_splits[r] rows of x go to rank r.
at::Tensor all_to_all_rows(const at::Tensor& x, const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits,
                           Communicator& group);

struct PendingExchange;
struct RowsInFlight {
  at::Tensor buffer;                         // the received rows, once finished
  std::shared_ptr<PendingExchange> pending;  // null when nothing is in flight (a group of one)
};
RowsInFlight start_all_to_all_rows(const at::Tensor& x, const std::vector<int64_t>& output_splits,
                                   const std::vector<int64_t>& input_splits, Communicator& group);
at::Tensor finish_all_to_all_rows(const RowsInFlight& rows);

// The same exchanges without autograd, for code that manages its own gradients.
at::Tensor gather_along_dim(const at::Tensor& x, int64_t dim, Communicator& group);
at::Tensor reduce_scatter_dim(const at::Tensor& x, int64_t dim, Communicator& group);
at::Tensor exchange_rows(const at::Tensor& x, const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits,
                         Communicator& group);

}  // namespace fmoe::parallel
