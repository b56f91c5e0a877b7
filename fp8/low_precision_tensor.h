// Optimizer state kept in a storage dtype narrower than FP32, loaded to FP32
// for the update and stored back after it:
//   fp32 | bf16 | fp16 (with a per-tensor power-of-two scale that keeps the
//   values inside FP16's normal range) | fp8 (E4M3 in 1 x block tiles of the
//   flattened tensor, FP32 scale per tile; optionally square-root transformed,
//   which halves the dynamic range of second moments) | fp4 (E2M1, two codes a
//   byte, 1 x block tiles with an FP32 scale per tile = the tile's max-abs / 6,
//   as MXFP4/NVFP4 hold values: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6) | nvfp4
//   (E2M1 as fp4, in NVFP4's layout: 1 x 16 tiles whatever the block size, an
//   E4M3 scale per tile, rounded up so no value saturates, and one FP32 scale
//   per tensor: 0.5625 bytes a value) | fp6 (E2M3, MXFP6's element: 1 x 32
//   tiles whatever the block size, a power-of-two E8M0 scale per tile, four
//   codes in three bytes: 0.78 bytes a value; rounded to nearest only).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace fmoe::fp8 {

enum class StorageDtype { kFp32, kBf16, kFp16, kFp8, kFp4, kNvfp4, kFp6 };

// "fp32" | "bf16" | "fp16" | "fp8" | "fp6" | "fp4" | "nvfp4"; throws std::invalid_argument otherwise.
StorageDtype parse_storage_dtype(const std::string& name);
std::string storage_dtype_name(StorageDtype dtype);
// The two E2M1 layouts.
inline bool is_fp4(StorageDtype dtype) { return dtype == StorageDtype::kFp4 || dtype == StorageDtype::kNvfp4; }

// Bytes one value of dtype takes in storage, its tile scales included (fp8 and
// fp4: an FP32 scale per 1 x block tile; nvfp4: an E4M3 per 16 values; fp6: an
// E8M0 per 32); a per-tensor scale (fp16's, nvfp4's FP32) is not counted.
double storage_bytes_per_value(StorageDtype dtype, int64_t block);

// FP8 state tiles, FP6, FP4 and NVFP4 code CPU tensors in one fused pass each,
// and BF16's stochastic rounding is one pass; on (for tests and benchmarks) CPU
// tensors take the tensor composition CUDA tensors take instead. Both store the
// same bits.
void use_codec_tensor_ops_on_cpu(bool on);

class LowPrecisionTensor {
 public:
  LowPrecisionTensor() = default;
  // Zeros of shape, stored on device.
  LowPrecisionTensor(at::IntArrayRef shape, StorageDtype dtype, int64_t block_size = 128, bool sqrt_transform = false,
                     c10::Device device = c10::kCPU);

  void store(const at::Tensor& value);  // any float tensor of the shape
  // BF16, FP8, FP4 and NVFP4 only: stochastic rounding (each value rounds up with the
  // probability of its distance from the lower neighbour, so small updates
  // survive on average and the stored value is unbiased), the noise a hash of
  // seed and the element's index: the same seed stores the same bits
  // (reproducible, bit-exact on resume), with no state to keep. (FP8, FP4 and
  // NVFP4 round the value over its tile's scale; FP8 with the square-root
  // transform rounds the square root, unbiased there. Rounded to nearest, a
  // value that moved less than half a step keeps its old code, so a second
  // moment whose gradients shrink stays too large.)
  void store_stochastic(const at::Tensor& value, uint32_t seed);
  // FP32, the shape. FP32 storage returns the stored tensor itself (a caller may
  // update it in place; storing it back then costs nothing), every other dtype a
  // fresh decoding the caller owns: neither needs a clone to be updated.
  at::Tensor load() const;
  int64_t bytes() const;                // storage including scales
  StorageDtype dtype() const { return dtype_; }

  // value rounded stochastically to BF16 (returned in BF16), as store_stochastic does.
  static at::Tensor stochastic_round_bf16(const at::Tensor& value, uint32_t seed);
  // value as it reads back after a store in dtype (for gradients kept in a narrow
  // dtype); with a seed, after store_stochastic (BF16, FP8, FP4 and NVFP4).
  // With a rotation_seed (FP4 and NVFP4 only), each 16-value tile of the flattened
  // value is rotated first by a random Hadamard transform (the 16 x 16 Sylvester
  // matrix / 4, its rows' signs drawn from the seed) and rotated back after the
  // load. The rotation is orthogonal: the rounding's error keeps its size but is
  // spread over the tile, and with a new seed each step rounding to nearest's
  // bias (a tile's small values flushed alike every step) becomes noise whose
  // mean over steps is zero.
  static at::Tensor round_trip(const at::Tensor& value, StorageDtype dtype, int64_t block_size = 128,
                               std::optional<uint32_t> seed = std::nullopt,
                               std::optional<uint32_t> rotation_seed = std::nullopt);

  // The exact stored bytes (data and scales) for checkpoints, and their restore.
  std::map<std::string, at::Tensor> parts() const;
  void restore(const std::map<std::string, at::Tensor>& parts, const std::string& source);

 private:
  at::Tensor fp8_input(const at::Tensor& v) const;  // what FP8 codes: v (or its square root), flattened

  std::vector<int64_t> shape_;
  StorageDtype dtype_ = StorageDtype::kFp32;
  int64_t block_size_ = 128;
  bool sqrt_transform_ = false;
  at::Tensor data_;    // fp32 / bf16 / fp16 values, uint8 E4M3 codes, uint8 pairs of E2M1 codes (low nibble first), or E2M3 codes 4 in 3 bytes
  at::Tensor scales_;  // fp16: one power-of-two scale; fp8, fp4: one per tile (FP32); nvfp4: one per tile (E4M3 as uint8); fp6: E8M0 per tile
  at::Tensor tensor_scale_;  // nvfp4: the tensor's FP32 scale
};

}  // namespace fmoe::fp8
