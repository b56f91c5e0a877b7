#include "fp8/low_precision_tensor.h"

#include <ATen/ATen.h>

#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#include "fp8/state_codecs.h"

namespace fmoe::fp8 {
namespace {

using codecs::as_tiles;
using codecs::decode_fp4;
using codecs::decode_fp6;
using codecs::decode_fp8;
using codecs::encode_fp4;
using codecs::encode_fp6;
using codecs::encode_fp8;
using codecs::encode_fp8_stochastic;
using codecs::encode_nvfp4;
using codecs::kFp6Block;
using codecs::kNvfp4Block;
using codecs::random_hadamard16;

constexpr double kFp16Target = 16384.0;  // scaled max-abs sits well inside FP16's range (max 65504)

}  // namespace

StorageDtype parse_storage_dtype(const std::string& name) {
  if (name == "fp32") return StorageDtype::kFp32;
  if (name == "bf16") return StorageDtype::kBf16;
  if (name == "fp16") return StorageDtype::kFp16;
  if (name == "fp8") return StorageDtype::kFp8;
  if (name == "fp4") return StorageDtype::kFp4;
  if (name == "nvfp4") return StorageDtype::kNvfp4;
  if (name == "fp6") return StorageDtype::kFp6;
  throw std::invalid_argument("unknown storage dtype '" + name + "' (fp32, bf16, fp16, fp8, fp6, fp4 or nvfp4)");
}

double storage_bytes_per_value(StorageDtype dtype, int64_t block) {
  const double tile_scale = 4.0 / static_cast<double>(block);
  switch (dtype) {
    case StorageDtype::kFp32: return 4;
    case StorageDtype::kBf16:
    case StorageDtype::kFp16: return 2;
    case StorageDtype::kFp8: return 1 + tile_scale;
    case StorageDtype::kFp4: return 0.5 + tile_scale;
    case StorageDtype::kNvfp4: return 0.5 + 1.0 / static_cast<double>(kNvfp4Block);
    case StorageDtype::kFp6: return 0.75 + 1.0 / static_cast<double>(kFp6Block);
  }
  return 4;
}

std::string storage_dtype_name(StorageDtype dtype) {
  switch (dtype) {
    case StorageDtype::kFp32: return "fp32";
    case StorageDtype::kBf16: return "bf16";
    case StorageDtype::kFp16: return "fp16";
    case StorageDtype::kFp8: return "fp8";
    case StorageDtype::kFp4: return "fp4";
    case StorageDtype::kNvfp4: return "nvfp4";
    case StorageDtype::kFp6: return "fp6";
  }
  return "?";
}

LowPrecisionTensor::LowPrecisionTensor(at::IntArrayRef shape, StorageDtype dtype, int64_t block_size, bool sqrt_transform,
                                       c10::Device device)
    : shape_(shape.vec()), dtype_(dtype), block_size_(block_size), sqrt_transform_(sqrt_transform) {
  store(at::zeros(shape, at::TensorOptions().dtype(at::kFloat).device(device)));
}

at::Tensor LowPrecisionTensor::fp8_input(const at::Tensor& v) const {
  return (sqrt_transform_ ? v.clamp_min(0).sqrt() : v).reshape({-1});
}

void LowPrecisionTensor::store(const at::Tensor& value) {
  const at::Tensor v = value.to(at::kFloat);
  switch (dtype_) {
    case StorageDtype::kFp32: data_ = v.is_same(data_) ? data_ : v.clone(); break;  // load()'s tensor, updated in place: kept
    case StorageDtype::kBf16: data_ = v.to(at::kBFloat16); break;
    case StorageDtype::kFp16: {
      // A power-of-two scale from the max-abs, computed where the data lives (no host read-back).
      const at::Tensor amax = v.abs().max().to(at::kDouble);
      const at::Tensor scale = at::where(amax > 0, at::exp2(at::ceil(at::log2(amax / kFp16Target))), at::ones_like(amax));
      scales_ = scale.to(at::kFloat).reshape({1});
      data_ = (v / scales_).to(at::kHalf);
      break;
    }
    case StorageDtype::kFp8: std::tie(data_, scales_) = encode_fp8(fp8_input(v), block_size_); break;
    case StorageDtype::kFp4: std::tie(data_, scales_) = encode_fp4(v.reshape({-1}), block_size_, std::nullopt); break;
    case StorageDtype::kNvfp4: std::tie(data_, scales_, tensor_scale_) = encode_nvfp4(v.reshape({-1}), std::nullopt); break;
    case StorageDtype::kFp6: std::tie(data_, scales_) = encode_fp6(v.reshape({-1})); break;
  }
}

at::Tensor LowPrecisionTensor::stochastic_round_bf16(const at::Tensor& value, uint32_t seed) {
  return codecs::stochastic_round_bf16(value, seed);
}

void LowPrecisionTensor::store_stochastic(const at::Tensor& value, uint32_t seed) {
  if (dtype_ == StorageDtype::kBf16) {
    data_ = stochastic_round_bf16(value, seed);
  } else if (is_fp4(dtype_)) {
    const at::Tensor flat = value.to(at::kFloat).reshape({-1});
    if (dtype_ == StorageDtype::kFp4) {
      std::tie(data_, scales_) = encode_fp4(flat, block_size_, seed);
    } else {
      std::tie(data_, scales_, tensor_scale_) = encode_nvfp4(flat, seed);
    }
  } else if (dtype_ == StorageDtype::kFp8) {
    std::tie(data_, scales_) = encode_fp8_stochastic(fp8_input(value.to(at::kFloat)), block_size_, seed);
  } else {
    throw std::logic_error("stochastic rounding stores BF16, FP8, FP4 and NVFP4 only");
  }
}

at::Tensor LowPrecisionTensor::load() const {
  switch (dtype_) {
    case StorageDtype::kFp32: return data_;
    case StorageDtype::kBf16: return data_.to(at::kFloat).view(shape_);
    case StorageDtype::kFp16: return (data_.to(at::kFloat) * scales_).view(shape_);
    case StorageDtype::kFp8: {
      const at::Tensor v = decode_fp8(data_, scales_, block_size_).view(shape_);
      return sqrt_transform_ ? v.square() : v;
    }
    case StorageDtype::kFp4:
    case StorageDtype::kNvfp4: {
      const bool nv = dtype_ == StorageDtype::kNvfp4;
      const at::Tensor scales = nv ? scales_.view(at::kFloat8_e4m3fn).to(at::kFloat) * tensor_scale_ : scales_;
      return decode_fp4(data_, scales, c10::multiply_integers(shape_), nv ? kNvfp4Block : block_size_).view(shape_);
    }
    case StorageDtype::kFp6: return decode_fp6(data_, scales_, c10::multiply_integers(shape_)).view(shape_);
  }
  return {};
}

at::Tensor LowPrecisionTensor::round_trip(const at::Tensor& value, StorageDtype dtype, int64_t block_size,
                                          std::optional<uint32_t> seed, std::optional<uint32_t> rotation_seed) {
  if (rotation_seed) {
    if (!is_fp4(dtype)) throw std::invalid_argument("round_trip: a Hadamard rotation is for fp4 and nvfp4 values");
    const at::Tensor tiles = as_tiles(value.to(at::kFloat).reshape({-1}), kNvfp4Block);
    const at::Tensor r = random_hadamard16(*rotation_seed, tiles.options());
    const at::Tensor back = at::matmul(round_trip(at::matmul(tiles, r), dtype, block_size, seed).view({-1, kNvfp4Block}), r.t());
    return back.reshape({-1}).narrow(0, 0, value.numel()).view(value.sizes()).to(value.scalar_type());
  }
  LowPrecisionTensor stored;
  stored.shape_ = value.sizes().vec();
  stored.dtype_ = dtype;
  stored.block_size_ = block_size;
  if (seed) {
    stored.store_stochastic(value, *seed);
  } else {
    stored.store(value);
  }
  return stored.load();
}

int64_t LowPrecisionTensor::bytes() const {
  const auto size = [](const at::Tensor& t) { return t.defined() ? t.numel() * static_cast<int64_t>(t.element_size()) : 0; };
  return size(data_) + size(scales_) + size(tensor_scale_);
}

std::map<std::string, at::Tensor> LowPrecisionTensor::parts() const {
  std::map<std::string, at::Tensor> out{{"data", data_}};
  if (scales_.defined()) out["scales"] = scales_;
  if (tensor_scale_.defined()) out["tensor_scale"] = tensor_scale_;
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
    if (scales == parts.end() || scales->second.scalar_type() != scales_.scalar_type() || !scales->second.sizes().equals(scales_.sizes())) {
      throw std::runtime_error(source + ": stored " + storage_dtype_name(dtype_) + " state is missing its scales");
    }
    scales_ = scales->second.to(scales_.device(), /*non_blocking=*/false, /*copy=*/true);
  }
  if (tensor_scale_.defined()) {
    const auto scale = parts.find("tensor_scale");
    if (scale == parts.end() || scale->second.numel() != 1 || scale->second.scalar_type() != at::kFloat) {
      throw std::runtime_error(source + ": stored " + storage_dtype_name(dtype_) + " state is missing its tensor scale");
    }
    tensor_scale_ = scale->second.to(tensor_scale_.device(), /*non_blocking=*/false, /*copy=*/true);
  }
}

}  // namespace fmoe::fp8
