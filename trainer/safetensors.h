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

// Streams tensors into path atomically (temporary file, fsync, rename) without a
// second in-memory copy of the data; returns the file's CRC32.
uint32_t write_safetensors(const std::string& path, const TensorMap& tensors,
                           const std::map<std::string, std::string>& metadata = {});

// Reads path straight into tensors (no staging copy of the file); the file's CRC32
// goes to *crc when given. Throws std::runtime_error naming the file on any damage.
TensorMap read_safetensors(const std::string& path, uint32_t* crc = nullptr);

// Parses bytes; path names the file in errors. Throws std::runtime_error on a
// truncated or inconsistent file.
TensorMap from_safetensors(const std::string& bytes, const std::string& path);

}  // namespace fmoe::trainer
