#include "trainer/safetensors.h"

#include <ATen/ATen.h>

#include <cstring>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace fmoe::trainer {
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

std::string to_safetensors(const TensorMap& tensors, const std::map<std::string, std::string>& metadata) {
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> contiguous;
  size_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    at::Tensor t = tensor.detach().to(at::kCPU).contiguous();
    const size_t bytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype_name(t.scalar_type())}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
    contiguous.push_back(std::move(t));
  }
  std::string json = header.dump();
  // Pad the header with spaces so the data starts 8-byte aligned.
  json.append((8 - json.size() % 8) % 8, ' ');
  std::string out;
  out.reserve(8 + json.size() + offset);
  const uint64_t header_size = json.size();
  out.append(reinterpret_cast<const char*>(&header_size), 8);
  out += json;
  for (const auto& t : contiguous) out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
  return out;
}

TensorMap from_safetensors(const std::string& bytes, const std::string& path) {
  if (bytes.size() < 8) throw std::runtime_error(path + ": truncated safetensors file (no header)");
  uint64_t header_size = 0;
  std::memcpy(&header_size, bytes.data(), 8);
  if (header_size > bytes.size() - 8) throw std::runtime_error(path + ": truncated safetensors file (header past end)");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.substr(8, header_size));
  } catch (const nlohmann::json::exception&) {
    throw std::runtime_error(path + ": corrupt safetensors header");
  }
  const size_t data_start = 8 + header_size;
  const size_t data_size = bytes.size() - data_start;
  TensorMap tensors;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") continue;
    try {
      const std::string dtype = entry.at("dtype").get<std::string>();
      const auto shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto offsets = entry.at("data_offsets").get<std::vector<size_t>>();
      at::ScalarType type = at::kFloat;
      bool known = false;
      for (const auto& d : kDtypes) {
        if (dtype == d.name) type = d.type, known = true;
      }
      if (!known) throw std::runtime_error("unsupported dtype " + dtype);
      at::Tensor tensor = at::empty(shape, at::TensorOptions().dtype(type));
      const size_t expected = tensor.numel() * tensor.element_size();
      if (offsets.size() != 2 || offsets[1] < offsets[0] || offsets[1] - offsets[0] != expected || offsets[1] > data_size) {
        throw std::runtime_error("data offsets inconsistent with shape or past the end of the file");
      }
      std::memcpy(tensor.data_ptr(), bytes.data() + data_start + offsets[0], expected);
      tensors.emplace(name, std::move(tensor));
    } catch (const std::exception& e) {
      throw std::runtime_error(path + ": tensor '" + name + "': " + e.what());
    }
  }
  return tensors;
}

}  // namespace fmoe::trainer
