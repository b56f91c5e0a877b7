#include "data/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <unordered_map>

#include "common/file_util.h"
#include "common/json_file.h"

namespace fmoe::data {

using common::read_file;
using common::crc32_of;
using common::write_file_atomic;
using common::read_json_file;

void train_tokenizer(const std::vector<std::string>& documents, const std::string& model_path,
                     const TokenizerTrainOptions& options) {
  if (documents.empty()) throw std::runtime_error("tokenizer: no documents to train on");
  namespace fs = std::filesystem;
  const fs::path model(model_path);
  if (model.has_parent_path()) fs::create_directories(model.parent_path());
  const std::string sample_path = model_path + ".train.txt";
  {
    // sentencepiece reads one sentence per line; documents are single lines.
    std::ofstream sample(sample_path);
    if (!sample) throw std::runtime_error(sample_path + ": cannot create");
    const int64_t total = static_cast<int64_t>(documents.size());
    const int64_t wanted = options.max_training_documents > 0 ? std::min(options.max_training_documents, total) : total;
    for (int64_t i = 0; i < wanted; ++i) sample << documents[static_cast<size_t>(i * total / wanted)] << '\n';
  }
  const std::string prefix = model_path + ".sp";
  const std::unordered_map<std::string, std::string> args = {
      {"input", sample_path},
      {"model_prefix", prefix},
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(options.vocab_size)},
      {"byte_fallback", "true"},
      {"character_coverage", "0.9995"},
      {"max_sentence_length", "16384"},
      {"num_threads", std::to_string(options.num_threads)},
      {"unk_id", "0"}, {"bos_id", "1"}, {"eos_id", "2"}, {"pad_id", "-1"},
      {"minloglevel", "1"},
  };
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  fs::remove(sample_path);
  fs::remove(prefix + ".vocab");
  if (!status.ok()) throw std::runtime_error("tokenizer training failed: " + status.ToString());
  const std::string bytes = read_file(prefix + ".model");
  fs::remove(prefix + ".model");
  write_file_atomic(model_path, bytes);
  const nlohmann::json meta = {{"vocab_size", options.vocab_size}, {"crc32", crc32_of(bytes)}};
  write_file_atomic(model_path + ".meta.json", meta.dump(2) + "\n");
}

Tokenizer Tokenizer::load(const std::string& model_path) {
  const std::string bytes = read_file(model_path);
  Tokenizer tokenizer;
  tokenizer.crc32_ = crc32_of(bytes);
  const std::string meta_path = model_path + ".meta.json";
  if (std::filesystem::exists(meta_path)) {
    const nlohmann::json meta = read_json_file(meta_path, "tokenizer metadata");
    if (meta.value("crc32", uint32_t{0}) != tokenizer.crc32_) {
      throw std::runtime_error(model_path + ": checksum mismatch: the tokenizer file is truncated or corrupt");
    }
  }
  tokenizer.processor_ = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = tokenizer.processor_->LoadFromSerializedProto(bytes);
  if (!status.ok() || tokenizer.processor_->GetPieceSize() <= 0) {
    throw std::runtime_error(model_path + ": not a valid sentencepiece model (truncated or corrupt)");
  }
  return tokenizer;
}

Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  std::vector<int> ids;
  const auto status = processor_->Encode(text, &ids);
  if (!status.ok()) throw std::runtime_error("tokenizer encode failed: " + status.ToString());
  return {ids.begin(), ids.end()};
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  std::string text;
  const auto status = processor_->Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  if (!status.ok()) throw std::runtime_error("tokenizer decode failed: " + status.ToString());
  return text;
}

int Tokenizer::vocab_size() const { return processor_->GetPieceSize(); }
int Tokenizer::eos_id() const { return processor_->eos_id(); }

}  // namespace fmoe::data
