#include "checkpoint/safetensors.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "common/file_util.h"

namespace fmoe::checkpoint {
namespace {

struct DtypeName {
  at::ScalarType type;
  const char* name;
};
constexpr DtypeName kDtypes[] = {{at::kFloat, "F32"},  {at::kDouble, "F64"}, {at::kBFloat16, "BF16"},
                                 {at::kHalf, "F16"},   {at::kLong, "I64"},   {at::kInt, "I32"},
                                 {at::kByte, "U8"},    {at::kChar, "I8"},    {at::kBool, "BOOL"},
                                 {at::kShort, "I16"}};

const char* dtype_name(at::ScalarType type) {
  for (const auto& d : kDtypes) {
    if (d.type == type) return d.name;
  }
  throw std::invalid_argument(std::string("safetensors: unsupported dtype ") + c10::toString(type));
}

}  // namespace

namespace {

// The header (8-byte length, then JSON padded to 8 bytes) for tensors laid out in
// name order; only shapes and dtypes are read, nothing is copied.
std::string safetensors_header(const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  size_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    const size_t bytes = tensor.numel() * tensor.element_size();
    header[name] = {{"dtype", dtype_name(tensor.scalar_type())}, {"shape", tensor.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // data starts 8-byte aligned
  const uint64_t header_size = json.size();
  std::string out(reinterpret_cast<const char*>(&header_size), 8);
  return out + json;
}

template <typename Sink>
void for_each_tensor_bytes(const TensorMap& tensors, Sink&& sink) {
  for (const auto& [name, tensor] : tensors) {
    // A no-op for the contiguous CPU tensors a checkpoint holds; anything else is copied one at a time.
    const at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    sink(t.data_ptr(), t.numel() * t.element_size());
  }
}

}  // namespace

std::string to_safetensors(const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  std::string out = safetensors_header(tensors, metadata);
  for_each_tensor_bytes(tensors, [&](const void* data, size_t size) { out.append(static_cast<const char*>(data), size); });
  return out;
}

uint32_t write_safetensors(const std::string& path, const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  common::AtomicFileWriter writer(path);
  writer.append(safetensors_header(tensors, metadata));
  for_each_tensor_bytes(tensors, [&](const void* data, size_t size) { writer.append(data, size); });
  return writer.commit();
}

namespace {

struct Entry {
  std::string name;
  at::ScalarType type;
  std::vector<int64_t> shape;
  size_t begin = 0, end = 0;
};

// Validated entries of a header, in file order; throws naming path and tensor.
std::vector<Entry> parse_header(const std::string& json, size_t data_size, const std::string& path) {
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(json);
  } catch (const nlohmann::json::exception&) {
    throw std::runtime_error(path + ": corrupt safetensors header");
  }
  std::vector<Entry> entries;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    try {
      Entry e;
      e.name = name;
      const std::string dtype = entry.at("dtype").get<std::string>();
      e.shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto offsets = entry.at("data_offsets").get<std::vector<size_t>>();
      bool known = false;
      for (const auto& d : kDtypes) {
        if (dtype == d.name) e.type = d.type, known = true;
      }
      if (!known) throw std::runtime_error("unsupported dtype " + dtype);
      size_t numel = 1;
      for (int64_t s : e.shape) {
        if (s < 0) throw std::runtime_error("negative dimension");
        numel *= static_cast<size_t>(s);
      }
      const size_t expected = numel * c10::elementSize(e.type);
      if (offsets.size() != 2 || offsets[1] < offsets[0] || offsets[1] - offsets[0] != expected || offsets[1] > data_size) {
        throw std::runtime_error("data offsets inconsistent with shape or past the end of the file");
      }
      e.begin = offsets[0];
      e.end = offsets[1];
      entries.push_back(std::move(e));
    } catch (const std::exception& e) {
      throw std::runtime_error(path + ": tensor '" + name + "': " + e.what());
    }
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  return entries;
}

}  // namespace

TensorMap read_safetensors(const std::string& path, uint32_t* crc) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  in.seekg(0, std::ios::end);
  const size_t file_size = static_cast<size_t>(in.tellg());
  in.seekg(0);
  uint32_t sum = 0;
  const auto read = [&](void* data, size_t size, const char* what) {
    if (!in.read(static_cast<char*>(data), static_cast<std::streamsize>(size))) {
      throw std::runtime_error(path + ": truncated safetensors file (" + what + ")");
    }
    sum = common::crc32_update(sum, data, size);
  };
  uint64_t header_size = 0;
  if (file_size < 8) throw std::runtime_error(path + ": truncated safetensors file (no header)");
  read(&header_size, 8, "no header");
  if (header_size > file_size - 8) throw std::runtime_error(path + ": truncated safetensors file (header past end)");
  std::string json(header_size, '\0');
  read(json.data(), header_size, "header");
  const size_t data_size = file_size - 8 - header_size;
  TensorMap tensors;
  size_t position = 0;
  for (const Entry& e : parse_header(json, data_size, path)) {
    if (e.begin != position) throw std::runtime_error(path + ": tensor '" + e.name + "': overlapping or non-contiguous data");
    at::Tensor tensor = at::empty(e.shape, at::TensorOptions().dtype(e.type));
    read(tensor.data_ptr(), e.end - e.begin, "data");  // straight into the tensor: no staging copy
    position = e.end;
    tensors.emplace(e.name, std::move(tensor));
  }
  if (position != data_size) throw std::runtime_error(path + ": trailing bytes after the last tensor");
  if (crc) *crc = sum;
  return tensors;
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd_, &st) != 0) throw std::runtime_error(path + ": cannot stat: " + std::strerror(errno));
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  uint64_t header_size = 0;
  if (file_size < 8) throw std::runtime_error(path + ": truncated safetensors file (no header)");
  read(0, &header_size, 8);
  if (header_size > file_size - 8) throw std::runtime_error(path + ": truncated safetensors file (header past end)");
  std::string json(header_size, '\0');
  read(8, json.data(), header_size);
  header_crc_ = common::crc32_update(common::crc32_update(0, &header_size, 8), json.data(), json.size());
  for (Entry& e : parse_header(json, file_size - 8 - header_size, path)) {
    entries_[e.name] = {e.type, std::move(e.shape), 8 + header_size + e.begin, 8 + header_size + e.end};
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (fd_ >= 0) ::close(fd_);
}

void SafetensorsFile::read(uint64_t offset, void* out, size_t size) const {
  char* dst = static_cast<char*>(out);
  while (size > 0) {
    const ssize_t got = ::pread(fd_, dst, size, static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) throw std::runtime_error(path_ + ": truncated safetensors file (data)");
    dst += got;
    offset += static_cast<uint64_t>(got);
    size -= static_cast<size_t>(got);
  }
}

TensorMap from_safetensors(const std::string& bytes, const std::string& path) {
  if (bytes.size() < 8) throw std::runtime_error(path + ": truncated safetensors file (no header)");
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  if (header_size > bytes.size() - 8) throw std::runtime_error(path + ": truncated safetensors file (header past end)");
  const size_t data_start = 8 + header_size;
  TensorMap tensors;
  for (const Entry& e : parse_header(bytes.substr(8, header_size), bytes.size() - data_start, path)) {
    at::Tensor tensor = at::empty(e.shape, at::TensorOptions().dtype(e.type));
    std::memcpy(tensor.data_ptr(), bytes.data() + data_start + e.begin, e.end - e.begin);
    tensors.emplace(e.name, std::move(tensor));
  }
  return tensors;
}

}  // namespace fmoe::checkpoint
