#include "fp8/low_precision_tensor.h"

#include <ATen/ATen.h>

#include <stdexcept>

#include "fp8/block_quant.h"

namespace fmoe::fp8 {
namespace {

constexpr double kFp16Target = 16384.0;  // scaled max-abs sits well inside FP16's range (max 65504)

BlockQuantOptions state_tiles(int64_t block) {
  BlockQuantOptions o;
  o.block_rows = 1;
  o.block_cols = block;
  return o;
}

}  // namespace

StorageDtype parse_storage_dtype(const std::string& name) {
  if (name == "fp32") return StorageDtype::kFp32;
  if (name == "bf16") return StorageDtype::kBf16;
  if (name == "fp16") return StorageDtype::kFp16;
  if (name == "fp8") return StorageDtype::kFp8;
  throw std::invalid_argument("unknown storage dtype '" + name + "' (fp32, bf16, fp16 or fp8)");
}

std::string storage_dtype_name(StorageDtype dtype) {
  switch (dtype) {
    case StorageDtype::kFp32: return "fp32";
    case StorageDtype::kBf16: return "bf16";
    case StorageDtype::kFp16: return "fp16";
    case StorageDtype::kFp8: return "fp8";
  }
  return "?";
}

LowPrecisionTensor::LowPrecisionTensor(at::IntArrayRef shape, StorageDtype dtype, int64_t block_size, bool sqrt_transform,
                                       c10::Device device)
    : shape_(shape.vec()), dtype_(dtype), block_size_(block_size), sqrt_transform_(sqrt_transform) {
  store(at::zeros(shape, at::TensorOptions().dtype(at::kFloat).device(device)));
}

void LowPrecisionTensor::store(const at::Tensor& value) {
  const at::Tensor v = value.to(at::kFloat);
  switch (dtype_) {
    case StorageDtype::kFp32: data_ = v.clone(); break;
    case StorageDtype::kBf16: data_ = v.to(at::kBFloat16); break;
    case StorageDtype::kFp16: {
      // A power-of-two scale from the max-abs, computed where the data lives (no host read-back).
      const at::Tensor amax = v.abs().max().to(at::kDouble);
      const at::Tensor scale = at::where(amax > 0, at::exp2(at::ceil(at::log2(amax / kFp16Target))), at::ones_like(amax));
      scales_ = scale.to(at::kFloat).reshape({1});
      data_ = (v / scales_).to(at::kHalf);
      break;
    }
    case StorageDtype::kFp8: {
      const at::Tensor flat = (sqrt_transform_ ? v.clamp_min(0).sqrt() : v).reshape({-1});
      const BlockQuantized q = quantize_blocks(flat, state_tiles(block_size_));
      data_ = q.codes;
      scales_ = q.scales;
      break;
    }
  }
}

at::Tensor LowPrecisionTensor::stochastic_round_bf16(const at::Tensor& value, uint32_t seed) {
  const at::Tensor v = value.to(at::kFloat).contiguous();
  // 16 random bits per element: a 32-bit integer hash of (index + seed), in
  // int64 arithmetic that never overflows (products below 2^59).
  constexpr int64_t kMask = 0xFFFFFFFFLL, kMul = 0x45d9f3b;
  at::Tensor x = at::arange(v.numel(), v.options().dtype(at::kLong)).add_(static_cast<int64_t>(seed)).bitwise_and_(kMask);
  for (int round = 0; round < 2; ++round) x = x.bitwise_xor(x.bitwise_right_shift(16)).mul_(kMul).bitwise_and_(kMask);
  const at::Tensor noise = x.bitwise_xor(x.bitwise_right_shift(16)).bitwise_and_(0xFFFF);
  // Adding the noise below BF16's last bit, then truncating, rounds the magnitude
  // up with probability (its dropped bits) / 2^16; the sign bit is untouched.
  const at::Tensor bits = v.view(at::kInt).reshape({-1}).to(at::kLong);
  const at::Tensor rounded = bits.add(noise).bitwise_and_(~int64_t{0xFFFF}).to(at::kInt).view(at::kFloat);
  return rounded.view(v.sizes()).to(at::kBFloat16);  // exact: the low 16 bits are zero
}

void LowPrecisionTensor::store_stochastic(const at::Tensor& value, uint32_t seed) {
  if (dtype_ != StorageDtype::kBf16) throw std::logic_error("stochastic rounding stores BF16 only");
  data_ = stochastic_round_bf16(value, seed);
}

at::Tensor LowPrecisionTensor::load() const {
  switch (dtype_) {
    case StorageDtype::kFp32: return data_;
    case StorageDtype::kBf16: return data_.to(at::kFloat).view(shape_);
    case StorageDtype::kFp16: return (data_.to(at::kFloat) * scales_).view(shape_);
    case StorageDtype::kFp8: {
      BlockQuantized q{data_, scales_, state_tiles(block_size_)};
      const at::Tensor v = dequantize_blocks(q).view(shape_);
      return sqrt_transform_ ? v.square() : v;
    }
  }
  return {};
}

at::Tensor LowPrecisionTensor::round_trip(const at::Tensor& value, StorageDtype dtype, int64_t block_size) {
  LowPrecisionTensor stored;
  stored.shape_ = value.sizes().vec();
  stored.dtype_ = dtype;
  stored.block_size_ = block_size;
  stored.store(value);
  return stored.load();
}

int64_t LowPrecisionTensor::bytes() const {
  return data_.numel() * data_.element_size() + (scales_.defined() ? scales_.numel() * 4 : 0);
}

std::map<std::string, at::Tensor> LowPrecisionTensor::parts() const {
  std::map<std::string, at::Tensor> out{{"data", data_}};
  if (scales_.defined()) out["scales"] = scales_;
  return out;
}

void LowPrecisionTensor::restore(const std::map<std::string, at::Tensor>& parts, const std::string& source) {
  const auto data = parts.find("data");
  if (data == parts.end() || data->second.scalar_type() != data_.scalar_type() || !data->second.sizes().equals(data_.sizes())) {
    throw std::runtime_error(source + ": stored " + storage_dtype_name(dtype_) + " state has the wrong dtype or shape");
  }
  data_ = data->second.to(data_.device(), /*non_blocking=*/false, /*copy=*/true);
  if (scales_.defined()) {
    const auto scales = parts.find("scales");
    if (scales == parts.end() || !scales->second.sizes().equals(scales_.sizes())) {
      throw std::runtime_error(source + ": stored " + storage_dtype_name(dtype_) + " state is missing its scales");
    }
    scales_ = scales->second.to(scales_.device(), /*non_blocking=*/false, /*copy=*/true);
  }
}

}  // namespace fmoe::fp8
