// SwiGLU experts computed grouped: rows [offset_e, offset_e + n_e) of x go
// through expert e. One autograd node for the whole group; per expert it runs
// three GEMMs forward and four backward, into preallocated buffers, and the
// element-wise SwiGLU over all rows at once. A dense FFN is the one-group case.
//
//   h = x_e W13_e    ([n, D] x [D, 2F]),  a = silu(h[:, :F]) * h[:, F:],  y_e = a W2_e  ([n, F] x [F, D])
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace fmoe::moe {

// x_SD, w13_GD2F, w2_GFD share one dtype; rows_per_group sums to x.size(0).
at::Tensor grouped_swiglu(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                          const std::vector<int64_t>& rows_per_group);

// One token at a time, with plain autograd ops: the slow reference for tests.
at::Tensor grouped_swiglu_reference(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                                    const std::vector<int64_t>& rows_per_group);

}  // namespace fmoe::moe
