// FP8 GEMM operands and products (DeepSeek-V3's recipe; the FP8 linear layer
// built on them is moe/linear.h): E4M3
// everywhere; activations and output gradients in 1 x 128 tiles along the
// reduction dimension, weights in 128 x 128 blocks; FP32 accumulation.
//
// On CPU every FP8 GEMM is emulated exactly: both operands are quantized and
// dequantized (fake_quantize), then multiplied by an FP32 GEMM. On CUDA tensors
// the first use probes at::_scaled_mm with 1x128 / 128x128 block scales against
// the emulation and uses it when they agree (M, N multiples of 128; K of 512
// when B is in blocks, of 128 otherwise), otherwise the emulation;
// fp8_gemm_backend() says which, and why.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace fmoe::fp8 {

inline constexpr int64_t kTile = 128;

// 1 x 128 tiles along the last dim (the reduction dim of x in x @ W).
at::Tensor quantize_rowwise(const at::Tensor& x);
// 128 x 1 tiles along dim -2 (the token dim: the reduction dim of x^T @ dy).
at::Tensor quantize_colwise(const at::Tensor& x);
// 128 x 128 blocks over the last two dims.
at::Tensor quantize_blockwise(const at::Tensor& w);

// out[M, N] = A[M, K] . B[N, K]^T on E4M3 operands, in FP32: A in 1 x 128 tiles
// along K; B in 128 x 128 blocks (b_blocks) or 1 x 128 tiles along K. Native
// at::_scaled_mm on a CUDA device where the probe accepted it and the shapes
// allow (above); the exact emulation otherwise.
at::Tensor fp8_mm(const at::Tensor& a, const at::Tensor& b, bool b_blocks);

// Which GEMM a device gets, and why, for the log.
std::string fp8_gemm_backend(const at::Device& device);

}  // namespace fmoe::fp8
