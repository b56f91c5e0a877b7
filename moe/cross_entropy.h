// Mean next-token cross-entropy that reduces in FP32 without an FP32 copy of
// the logits: rows are processed in cache-sized chunks (upcast, log-sum-exp,
// and in backward softmax minus one-hot, written straight back in the logits'
// dtype). For BF16 logits of [tokens, vocab] this saves two full FP32 passes
// and the FP32 log-probabilities autograd would otherwise keep.
#pragma once

#include <ATen/core/Tensor.h>

namespace fmoe::moe {

// logits_NV: [N, V] float or bfloat16; targets_N: int64 [N]. Returns an FP32 scalar.
at::Tensor chunked_cross_entropy(const at::Tensor& logits_NV, const at::Tensor& targets_N, int64_t chunk_rows = 32);

}  // namespace fmoe::moe
