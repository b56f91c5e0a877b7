// Fine-grained FP8 scaling as DeepSeek-V3 does it: one FP32 scale per block of
// the last two dimensions, taken from the block's current max-abs (no delayed
// scaling), so an outlier only costs precision inside its own block.
//
//   activations, output gradients: 1 x 128 tiles along the reduction dimension
//   weights:                       128 x 128 blocks
//
// The vectorised encode/decode use LibTorch's float8 dtypes, which are bit-exact
// to the OCP spec (tests compare them with fp8/codec.h code by code).
#pragma once

#include <ATen/core/Tensor.h>

#include "fp8/codec.h"

namespace fmoe::fp8 {

struct BlockQuantOptions {
  Format format = Format::kE4M3;
  int64_t block_rows = 1;
  int64_t block_cols = 128;
  bool power_of_two_scales = false;  // round scales up to powers of two (exact rescaling)
};

// A tensor stored as FP8 codes plus one FP32 scale per block of its last two dims.
struct BlockQuantized {
  at::Tensor codes;   // uint8, the original shape
  at::Tensor scales;  // fp32 [..., ceil(rows / block_rows), ceil(cols / block_cols)]
  BlockQuantOptions options;
  int64_t bytes() const { return codes.numel() + scales.numel() * 4; }
};

// Vectorised codecs: any float tensor -> uint8 codes of the same shape, and back (fp32).
at::Tensor encode_tensor(const at::Tensor& x, Format format, Overflow overflow);
at::Tensor decode_tensor(const at::Tensor& codes, Format format);

// x: at least 2-D (a 1-D tensor is one row). Training casts saturate.
BlockQuantized quantize_blocks(const at::Tensor& x, const BlockQuantOptions& options);
at::Tensor dequantize_blocks(const BlockQuantized& q);  // fp32, the original shape
// dequantize(quantize(x)) in fp32: what an FP8 GEMM sees of x.
at::Tensor fake_quantize(const at::Tensor& x, const BlockQuantOptions& options);

}  // namespace fmoe::fp8
