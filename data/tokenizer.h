// A sentencepiece BPE tokenizer, trained and applied through the sentencepiece
// C++ library. Beside every model we write "<model>.meta.json" with its CRC32 so
// that a truncated or corrupted tokenizer is refused by name rather than used.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace fmoe::data {

struct TokenizerTrainOptions {
  int vocab_size = 8192;
  // Documents sampled (evenly spaced) for training; 0 takes all.
  int64_t max_training_documents = 60000;
  int num_threads = 2;
};

// Trains a BPE model with byte fallback on documents and writes model_path
// plus model_path + ".meta.json".
void train_tokenizer(const std::vector<std::string>& documents, const std::string& model_path,
                     const TokenizerTrainOptions& options);

class Tokenizer {
 public:
  // Throws a one-line error naming the file when it is missing, truncated or corrupt.
  static Tokenizer load(const std::string& model_path);
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  std::vector<int32_t> encode(const std::string& text) const;
  std::string decode(const std::vector<int32_t>& ids) const;
  int vocab_size() const;
  int eos_id() const;
  uint32_t crc32() const { return crc32_; }

 private:
  Tokenizer() = default;
  std::unique_ptr<sentencepiece::SentencePieceProcessor> processor_;
  uint32_t crc32_ = 0;
};

}  // namespace fmoe::data
