// Reading and writing the safetensors format: an 8-byte little-endian header
// length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {...}},
// then the raw little-endian tensor bytes.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

namespace fmoe::checkpoint {

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

// A safetensors file opened for pieces of its tensors: the header is read and
// checked at open, data is read on demand (pread), nothing else.
struct SafetensorsEntry {
  at::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // absolute byte offsets of the data in the file
};
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // throws naming the file when it is unreadable
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  const std::string& path() const { return path_; }
  const std::map<std::string, SafetensorsEntry>& entries() const { return entries_; }
  uint32_t header_crc() const { return header_crc_; }  // CRC32 of the length field and the header
  // size bytes at offset; throws naming the file on a short read.
  void read(uint64_t offset, void* out, size_t size) const;

 private:
  std::string path_;
  int fd_ = -1;
  uint32_t header_crc_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
};

// Parses bytes; path names the file in errors. Throws std::runtime_error on a
// truncated or inconsistent file.
TensorMap from_safetensors(const std::string& bytes, const std::string& path);

}  // namespace fmoe::checkpoint
