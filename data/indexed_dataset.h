// Indexed token datasets in Megatron-LM's MMIDIDX layout (one sequence per
// document), so Megatron's .bin/.idx files load here and ours load there:
//
//   <prefix>.idx  magic "MMIDIDX\0\0" | u64 version=1 | u8 dtype code |
//                 u64 sequence count N | u64 document-index count N+1 |
//                 i32 lengths[N] | i64 byte pointers[N] | i64 document indices[N+1]
//   <prefix>.bin  the token ids, back to back, in the idx's dtype
//   <prefix>.meta.json  (ours, optional on read) vocab size and CRC32s
//
// Files are memory-mapped; open() refuses a truncated or corrupt pair with a
// one-line error naming the file.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace fmoe::data {

// Megatron's dtype codes.
enum class TokenDtype : uint8_t { kUInt8 = 1, kInt16 = 3, kInt32 = 4, kInt64 = 5, kUInt16 = 8 };

size_t token_dtype_size(TokenDtype dtype);

class IndexedDatasetWriter {
 public:
  // uint16 holds any vocabulary up to 65536 tokens, else int32.
  IndexedDatasetWriter(std::string prefix, int64_t vocab_size);
  void add_document(const std::vector<int32_t>& tokens);
  // Writes .bin, .idx and .meta.json atomically. extra_meta is merged into the JSON.
  void finalize(const std::string& extra_meta_json = "{}");

 private:
  std::string prefix_;
  int64_t vocab_size_;
  TokenDtype dtype_;
  std::string bin_;
  std::vector<int32_t> lengths_;
};

class IndexedDataset {
 public:
  static std::shared_ptr<const IndexedDataset> open(const std::string& prefix);
  ~IndexedDataset();
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;

  int64_t num_documents() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t num_tokens() const { return num_tokens_; }
  int64_t document_length(int64_t doc) const { return lengths_[static_cast<size_t>(doc)]; }
  // Copies count tokens of doc starting at offset into out (widened to int64).
  void copy_tokens(int64_t doc, int64_t offset, int64_t count, int64_t* out) const;
  // Vocabulary size recorded in the metadata, or 0 when the dataset has none.
  int64_t vocab_size() const { return vocab_size_; }
  TokenDtype dtype() const { return dtype_; }
  const std::string& prefix() const { return prefix_; }

 private:
  IndexedDataset() = default;
  std::string prefix_;
  TokenDtype dtype_ = TokenDtype::kUInt16;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> pointers_;
  int64_t num_tokens_ = 0;
  int64_t vocab_size_ = 0;
  const uint8_t* bin_ = nullptr;
  size_t bin_size_ = 0;
};

}  // namespace fmoe::data
