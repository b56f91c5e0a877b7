// Rotary position embedding fused with the split of the QKV projection.
//
// The plain composition (narrow q, k, v out of qkv; rotate each half pair; cat)
// costs, in backward, a zero-filled gradient of the whole projection per narrow
// and a sum of them, plus the cat's and the rotation's own kernels. Here the
// rotation is written straight into new q and k tensors (two kernels per half),
// and backward writes the inverse rotation of dq and dk and the copy of dv
// straight into one dqkv buffer: no zero fills, no sums.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>

namespace fmoe::moe {

struct RotatedQkv {
  at::Tensor q_BTHd, k_BTKd, v_BTKd;  // v is a view of qkv
};

// qkv_BTCd: [B, T, heads + 2 kv_heads, head_dim]; cos_TH / sin_TH: [T, head_dim / 2] FP32.
// Differentiable in qkv.
RotatedQkv split_qkv_rope(const at::Tensor& qkv_BTCd, int64_t heads, int64_t kv_heads, const at::Tensor& cos_TH,
                          const at::Tensor& sin_TH);

}  // namespace fmoe::moe
