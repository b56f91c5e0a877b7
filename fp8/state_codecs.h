// The codecs behind LowPrecisionTensor's narrow storage dtypes, on flattened
// FP32 tensors. CPU tensors take one fused pass each (unless
// use_codec_tensor_ops_on_cpu turns that off), every other device a tensor
// composition of the same arithmetic: both store the same bits. Seeded
// functions round stochastically, their noise a hash of the seed and each
// element's index.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

namespace fmoe::fp8::codecs {

constexpr int64_t kNvfp4Block = 16;  // NVFP4's tile, whatever the block size
constexpr int64_t kFp6Block = 32;    // MXFP6's tile, whatever the block size

// flat's values in 1 x block tiles (the last one zero-padded): [tiles, block].
at::Tensor as_tiles(const at::Tensor& flat, int64_t block);
// A 16 x 16 Sylvester Hadamard matrix / 4 with its rows' signs drawn from seed (orthogonal).
at::Tensor random_hadamard16(uint32_t seed, const at::TensorOptions& options);

// E4M3 codes (uint8 [n]) and an FP32 scale per 1 x block tile ([1, tiles]), rounded to nearest.
std::pair<at::Tensor, at::Tensor> encode_fp8(const at::Tensor& flat, int64_t block);
// As encode_fp8, rounded stochastically.
std::pair<at::Tensor, at::Tensor> encode_fp8_stochastic(const at::Tensor& flat, int64_t block, uint32_t seed);
at::Tensor decode_fp8(const at::Tensor& codes, const at::Tensor& scales, int64_t block);  // FP32 [n]

// E2M1 codes two a byte (low nibble first) and an FP32 scale per tile (max-abs / 6).
std::pair<at::Tensor, at::Tensor> encode_fp4(const at::Tensor& flat, int64_t block, std::optional<uint32_t> seed);
// NVFP4's layout: codes, an E4M3 scale per 16 values (as uint8), one FP32 scale for the tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> encode_nvfp4(const at::Tensor& flat, std::optional<uint32_t> seed);
// scales: FP32 per tile (NVFP4's already multiplied out).
at::Tensor decode_fp4(const at::Tensor& packed, const at::Tensor& scales, int64_t n, int64_t block);

// E2M3 codes four in three bytes and an E8M0 scale per 32 values, rounded to nearest.
std::pair<at::Tensor, at::Tensor> encode_fp6(const at::Tensor& flat);
at::Tensor decode_fp6(const at::Tensor& packed, const at::Tensor& scales, int64_t n);

// value (any shape) rounded stochastically to BF16.
at::Tensor stochastic_round_bf16(const at::Tensor& value, uint32_t seed);

}  // namespace fmoe::fp8::codecs
