// RMSNorm as one autograd node: y = x * rsqrt(mean(x^2) + eps) * w, with the
// closed-form backward
//   dx = r (g w) - x r^3 mean(g w x),   dw = sum over tokens of g x r.
// Autograd's composition of the same expression runs about twelve elementwise
// kernels and temporaries per norm; this one about seven.
#pragma once

#include <ATen/core/Tensor.h>

namespace fmoe::moe {

// x: [..., D] FP32; weight: [D] FP32. Returns out_dtype. Differentiable in x and weight.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype);

// The plain autograd composition, the reference the fused node is tested against.
at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype);

}  // namespace fmoe::moe
