// The model's linear layer as its own autograd node, so its weight gradient can
// be deferred (moe/weight_grad.h): y = x W^T in x's dtype, x [..., K], W [N, K].
// With fp8, DeepSeek-V3's recipe (fp8/fp8_gemm.h): the forward, input-gradient
// and weight-gradient GEMMs on E4M3 operands, W the FP32 master, x any float
// dtype. Without, W in x's dtype (the caller casts).
#pragma once

#include <ATen/core/Tensor.h>

namespace fmoe::moe {

at::Tensor deferrable_linear(const at::Tensor& x, const at::Tensor& weight, bool fp8 = false);

}  // namespace fmoe::moe
