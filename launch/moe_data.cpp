// moe-data: corpus preparation.
//
//   moe-data prepare   --config FILE [--set k=v]...   tokenizer (if missing) + dataset, as the config names them
//   moe-data tokenizer --input SRC... --vocab-size N --output MODEL [--documents N]
//   moe-data tokenize  --input SRC... --tokenizer MODEL --output PREFIX
//
// SRC is "gcide" (the dict-gcide package's dictionary) or a UTF-8 text file
// whose paragraphs are documents.
#include <algorithm>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/corpus.h"
#include "data/indexed_dataset.h"
#include "data/tokenizer.h"
#include "launch/cli.h"
#include "config/config.h"

namespace {

using namespace fmoe;

constexpr const char* kGcideDict = "/usr/share/dictd/gcide.dict.dz";
constexpr const char* kGcideIndex = "/usr/share/dictd/gcide.index";

std::vector<std::string> read_sources(const std::vector<std::string>& sources, int64_t max_documents) {
  std::vector<std::string> documents;
  for (const auto& source : sources) {
    auto docs = source == "gcide" ? data::read_gcide(kGcideDict, kGcideIndex) : data::read_text_documents(source);
    std::printf("read %zu documents from %s\n", docs.size(), source.c_str());
    documents.insert(documents.end(), std::make_move_iterator(docs.begin()), std::make_move_iterator(docs.end()));
  }
  if (documents.empty()) throw std::runtime_error("no documents in the given inputs");
  if (max_documents > 0 && static_cast<int64_t>(documents.size()) > max_documents) {
    documents.resize(static_cast<size_t>(max_documents));
    std::printf("kept the first %lld documents\n", static_cast<long long>(max_documents));
  }
  return documents;
}

void tokenize(const std::vector<std::string>& documents, const std::string& tokenizer_path, const std::string& prefix,
              const std::vector<std::string>& sources) {
  const auto tokenizer = data::Tokenizer::load(tokenizer_path);
  // Encode in parallel (sentencepiece's Encode is const and thread-safe), write in order.
  std::vector<std::vector<int32_t>> encoded(documents.size());
  const size_t workers = std::max(1u, std::thread::hardware_concurrency());
  std::vector<std::thread> threads;
  for (size_t w = 0; w < workers; ++w) {
    threads.emplace_back([&, w] {
      for (size_t i = w; i < documents.size(); i += workers) {
        encoded[i] = tokenizer.encode(documents[i]);
        encoded[i].push_back(tokenizer.eos_id());
      }
    });
  }
  for (auto& t : threads) t.join();
  data::IndexedDatasetWriter writer(prefix, tokenizer.vocab_size());
  size_t tokens = 0;
  for (const auto& doc : encoded) {
    writer.add_document(doc);
    tokens += doc.size();
  }
  nlohmann::json meta = {{"tokenizer", tokenizer_path}, {"tokenizer_crc32", tokenizer.crc32()}, {"sources", sources}};
  writer.finalize(meta.dump());
  std::printf("wrote %s.{bin,idx}: %zu documents, %zu tokens\n", prefix.c_str(), encoded.size(), tokens);
}

void train(const std::vector<std::string>& documents, const std::string& output, int vocab, int64_t docs) {
  data::TokenizerTrainOptions options;
  options.vocab_size = vocab;
  options.max_training_documents = docs;
  options.num_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  std::printf("training a %d-token BPE tokenizer on up to %lld documents\n", vocab, static_cast<long long>(docs));
  data::train_tokenizer(documents, output, options);
  std::printf("wrote %s\n", output.c_str());
}

int64_t to_int(const std::string& text, const std::string& option) {
  try {
    size_t used = 0;
    const int64_t value = std::stoll(text, &used);
    if (used == text.size()) return value;
  } catch (const std::exception&) {
  }
  throw std::invalid_argument("--" + option + ": expected an integer, got '" + text + "'");
}

constexpr const char* kUsage =
    "usage: moe-data prepare --config FILE [--set k=v]... [--force]\n"
    "       moe-data tokenizer --input SRC... --vocab-size N --output MODEL [--documents N] [--max-documents N]\n"
    "       moe-data tokenize --input SRC... --tokenizer MODEL --output PREFIX [--max-documents N]\n"
    "--documents samples that many documents for tokenizer training; --max-documents keeps only the first N read.\n"
    "SRC is 'gcide' or a text file whose blank-line separated paragraphs are documents.\n";

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2 || std::string(argv[1]) == "--help") {
      std::fputs(kUsage, argc < 2 ? stderr : stdout);
      return argc < 2 ? 2 : 0;
    }
    const std::string command = argv[1];
    const auto args = launch::parse_args(argc, argv, 2, {"force"});
    const int64_t max_docs = to_int(args.get("max-documents", "0"), "max-documents");
    if (command == "prepare") {
      if (!args.has("config")) throw std::invalid_argument("prepare needs --config FILE");
      const auto config = config::load_config(args.get("config"), args.all("set"));
      const auto& dc = config.data;
      const bool force = args.has("force");
      const bool have_tokenizer = std::filesystem::exists(dc.tokenizer);
      const bool have_dataset = std::filesystem::exists(dc.prefix + ".idx");
      if (have_tokenizer && have_dataset && !force) {
        std::printf("%s and %s.{bin,idx} exist; nothing to do (--force rebuilds)\n", dc.tokenizer.c_str(), dc.prefix.c_str());
        return 0;
      }
      const auto documents = read_sources(dc.sources, 0);
      if (!have_tokenizer || force) {
        train(documents, dc.tokenizer, static_cast<int>(config.model.vocab_size), dc.tokenizer_training_documents);
      }
      tokenize(documents, dc.tokenizer, dc.prefix, dc.sources);
    } else if (command == "tokenizer") {
      if (!args.has("input") || !args.has("output")) throw std::invalid_argument("tokenizer needs --input and --output");
      train(read_sources(args.all("input"), max_docs), args.get("output"), static_cast<int>(to_int(args.get("vocab-size", "8192"), "vocab-size")),
            to_int(args.get("documents", "60000"), "documents"));
    } else if (command == "tokenize") {
      if (!args.has("input") || !args.has("tokenizer") || !args.has("output")) {
        throw std::invalid_argument("tokenize needs --input, --tokenizer and --output");
      }
      const auto inputs = args.all("input");
      tokenize(read_sources(inputs, max_docs), args.get("tokenizer"), args.get("output"), inputs);
    } else {
      std::fprintf(stderr, "moe-data: unknown command '%s'\n%s", command.c_str(), kUsage);
      return 2;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-data: error: %s\n", launch::error_message(e).c_str());
    return 1;
  }
}
