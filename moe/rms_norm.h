// RMSNorm as one autograd node: y = x * rsqrt(mean(x^2) + eps) * w, with the
// closed-form backward
//   dx = r (g w) - x r^3 mean(g w x),   dw = sum over tokens of g x r.
// On CPU tensors forward and backward are each one pass over the rows (the
// fused kernels of moe/cpu_kernels.h); elsewhere a few ATen kernels.
// add_rms_norm also folds the residual add in front of the norm into the same
// pass (s = x + delta is written once and normalised while it is in cache).
#pragma once

#include <ATen/core/Tensor.h>

#include <utility>

namespace fmoe::moe {

// x: [..., D] FP32; weight: [D] FP32. Returns out_dtype. Differentiable in x and weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype);

// s = x + delta.to(FP32) and y = rms_norm(s, weight): returns {s, y}. x FP32, delta
// FP32 or BF16 of x's shape. Differentiable in x, delta and weight; the gradient
// reaching s directly and the one through y are summed in one pass.
std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps,
                                               at::ScalarType out_dtype);

// The plain autograd composition, the reference the fused node is tested against.
at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype);

}  // namespace fmoe::moe
