#include "data/indexed_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "common/file_util.h"
#include "common/json_file.h"

namespace fmoe::data {

using common::read_file;
using common::crc32_of;
using common::write_file_atomic;
using common::read_json_file;
namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr size_t kHeaderSize = 9 + 8 + 1 + 8 + 8;

template <class T>
void append_pod(std::string& out, const T& value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

template <class T>
T read_pod(const std::string& bytes, size_t offset) {
  T value;
  std::memcpy(&value, bytes.data() + offset, sizeof(T));
  return value;
}

bool valid_dtype_code(uint8_t code) {
  return code == 1 || code == 3 || code == 4 || code == 5 || code == 8;
}

}  // namespace

size_t token_dtype_size(TokenDtype dtype) {
  switch (dtype) {
    case TokenDtype::kUInt8: return 1;
    case TokenDtype::kInt16: return 2;
    case TokenDtype::kUInt16: return 2;
    case TokenDtype::kInt32: return 4;
    case TokenDtype::kInt64: return 8;
  }
  return 0;
}

IndexedDatasetWriter::IndexedDatasetWriter(std::string prefix, int64_t vocab_size)
    : prefix_(std::move(prefix)),
      vocab_size_(vocab_size),
      dtype_(vocab_size <= 65536 ? TokenDtype::kUInt16 : TokenDtype::kInt32) {}

void IndexedDatasetWriter::add_document(const std::vector<int32_t>& tokens) {
  for (int32_t id : tokens) {
    if (id < 0 || id >= vocab_size_) {
      throw std::runtime_error(prefix_ + ": token id " + std::to_string(id) + " outside vocabulary of " + std::to_string(vocab_size_));
    }
    if (dtype_ == TokenDtype::kUInt16) {
      append_pod(bin_, static_cast<uint16_t>(id));
    } else {
      append_pod(bin_, id);
    }
  }
  lengths_.push_back(static_cast<int32_t>(tokens.size()));
}

void IndexedDatasetWriter::finalize(const std::string& extra_meta_json) {
  const uint64_t count = lengths_.size();
  std::string idx(kMagic, sizeof(kMagic));
  append_pod(idx, uint64_t{1});
  append_pod(idx, static_cast<uint8_t>(dtype_));
  append_pod(idx, count);
  append_pod(idx, count + 1);
  for (int32_t length : lengths_) append_pod(idx, length);
  int64_t pointer = 0;
  for (int32_t length : lengths_) {
    append_pod(idx, pointer);
    pointer += static_cast<int64_t>(length) * static_cast<int64_t>(token_dtype_size(dtype_));
  }
  for (uint64_t i = 0; i <= count; ++i) append_pod(idx, static_cast<int64_t>(i));

  const std::filesystem::path dir = std::filesystem::path(prefix_).parent_path();
  if (!dir.empty()) std::filesystem::create_directories(dir);
  write_file_atomic(prefix_ + ".bin", bin_);
  write_file_atomic(prefix_ + ".idx", idx);
  nlohmann::json meta = nlohmann::json::parse(extra_meta_json);
  meta["vocab_size"] = vocab_size_;
  meta["num_documents"] = count;
  meta["num_tokens"] = bin_.size() / token_dtype_size(dtype_);
  meta["bin_crc32"] = crc32_of(bin_);
  meta["idx_crc32"] = crc32_of(idx);
  write_file_atomic(prefix_ + ".meta.json", meta.dump(2) + "\n");
}

std::shared_ptr<const IndexedDataset> IndexedDataset::open(const std::string& prefix) {
  const std::string idx_path = prefix + ".idx";
  const std::string bin_path = prefix + ".bin";
  const std::string idx = read_file(idx_path);
  auto fail = [](const std::string& path, const std::string& why) -> std::runtime_error {
    return std::runtime_error(path + ": " + why);
  };
  if (idx.size() < kHeaderSize || std::memcmp(idx.data(), kMagic, sizeof(kMagic)) != 0) {
    throw fail(idx_path, "not an MMIDIDX index (bad magic or truncated header)");
  }
  if (read_pod<uint64_t>(idx, 9) != 1) throw fail(idx_path, "unsupported index version");
  const uint8_t dtype_code = read_pod<uint8_t>(idx, 17);
  if (!valid_dtype_code(dtype_code)) throw fail(idx_path, "unsupported token dtype code " + std::to_string(dtype_code));
  const uint64_t count = read_pod<uint64_t>(idx, 18);
  const uint64_t doc_count = read_pod<uint64_t>(idx, 26);
  const uint64_t expected = kHeaderSize + count * 4 + count * 8 + doc_count * 8;
  if (count > idx.size() || doc_count > idx.size() || expected != idx.size()) {
    throw fail(idx_path, "truncated or corrupt index: size " + std::to_string(idx.size()) + " bytes, header implies " + std::to_string(expected));
  }

  std::shared_ptr<IndexedDataset> dataset(new IndexedDataset());
  dataset->prefix_ = prefix;
  dataset->dtype_ = static_cast<TokenDtype>(dtype_code);
  dataset->lengths_.resize(count);
  dataset->pointers_.resize(count);
  std::memcpy(dataset->lengths_.data(), idx.data() + kHeaderSize, count * 4);
  std::memcpy(dataset->pointers_.data(), idx.data() + kHeaderSize + count * 4, count * 8);
  const int64_t item = static_cast<int64_t>(token_dtype_size(dataset->dtype_));
  int64_t expected_pointer = 0;
  for (uint64_t i = 0; i < count; ++i) {
    if (dataset->lengths_[i] < 0 || dataset->pointers_[i] != expected_pointer) {
      throw fail(idx_path, "corrupt index: sequence " + std::to_string(i) + " has an inconsistent length or pointer");
    }
    expected_pointer += dataset->lengths_[i] * item;
  }
  dataset->num_tokens_ = expected_pointer / item;

  const int fd = ::open(bin_path.c_str(), O_RDONLY);
  if (fd < 0) throw fail(bin_path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  if (static_cast<int64_t>(st.st_size) != expected_pointer) {
    ::close(fd);
    throw fail(bin_path, "truncated or corrupt: " + std::to_string(st.st_size) + " bytes, index implies " + std::to_string(expected_pointer));
  }
  dataset->bin_size_ = static_cast<size_t>(st.st_size);
  if (dataset->bin_size_ > 0) {
    void* mapped = ::mmap(nullptr, dataset->bin_size_, PROT_READ, MAP_PRIVATE, fd, 0);
    ::close(fd);
    if (mapped == MAP_FAILED) throw fail(bin_path, "mmap failed");
    dataset->bin_ = static_cast<const uint8_t*>(mapped);
  } else {
    ::close(fd);
  }

  const std::string meta_path = prefix + ".meta.json";
  if (std::filesystem::exists(meta_path)) {
    const nlohmann::json meta = read_json_file(meta_path, "dataset metadata");
    const std::string_view bin_bytes(reinterpret_cast<const char*>(dataset->bin_), dataset->bin_size_);
    if (meta.value("bin_crc32", uint32_t{0}) != crc32_of(bin_bytes)) {
      throw fail(bin_path, "checksum mismatch: the token file is corrupt");
    }
    if (meta.value("idx_crc32", uint32_t{0}) != crc32_of(idx)) {
      throw fail(idx_path, "checksum mismatch: the index file is corrupt");
    }
    dataset->vocab_size_ = meta.value("vocab_size", int64_t{0});
  }
  return dataset;
}

IndexedDataset::~IndexedDataset() {
  if (bin_) ::munmap(const_cast<uint8_t*>(bin_), bin_size_);
}

void IndexedDataset::copy_tokens(int64_t doc, int64_t offset, int64_t count, int64_t* out) const {
  const uint8_t* base = bin_ + pointers_[static_cast<size_t>(doc)];
  switch (dtype_) {
    case TokenDtype::kUInt8:
      for (int64_t i = 0; i < count; ++i) out[i] = base[offset + i];
      break;
    case TokenDtype::kInt16: {
      const auto* p = reinterpret_cast<const int16_t*>(base) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = p[i];
      break;
    }
    case TokenDtype::kUInt16: {
      const auto* p = reinterpret_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = p[i];
      break;
    }
    case TokenDtype::kInt32: {
      const auto* p = reinterpret_cast<const int32_t*>(base) + offset;
      for (int64_t i = 0; i < count; ++i) out[i] = p[i];
      break;
    }
    case TokenDtype::kInt64:
      std::memcpy(out, base + offset * 8, static_cast<size_t>(count) * 8);
      break;
  }
}

}  // namespace fmoe::data
