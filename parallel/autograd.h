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
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
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

// The same exchanges without autograd, for code that manages its own gradients.
at::Tensor gather_along_dim(const at::Tensor& x, int64_t dim, Communicator& group);
at::Tensor reduce_scatter_dim(const at::Tensor& x, int64_t dim, Communicator& group);
at::Tensor exchange_rows(const at::Tensor& x, const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits,
                         Communicator& group);

}  // namespace fmoe::parallel
