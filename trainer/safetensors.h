// Reading and writing the safetensors format: an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
// then the raw little-endian tensor bytes.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>

namespace fmoe::trainer {

using TensorMap = std::map<std::string, at::Tensor>;

// Serialises tensors (CPU, any layout) into safetensors bytes.
std::string to_safetensors(const TensorMap& tensors, const std::map<std::string, std::string>& metadata = {});

// Parses bytes; path names the file in errors. Throws std::runtime_error on a
// truncated or inconsistent file.
TensorMap from_safetensors(const std::string& bytes, const std::string& path);

}  // namespace fmoe::trainer
