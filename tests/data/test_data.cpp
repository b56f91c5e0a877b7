#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>

#include "data/corpus.h"
#include "common/file_util.h"
#include "data/indexed_dataset.h"
#include "data/loader.h"
#include "data/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using namespace fmoe::data;
using fmoe::common::read_file;

class TempDir : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("fmoe_data_" + std::to_string(::getpid()) + "_" +
                                        ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

// Document d holds tokens d*1000 + [0, length(d)), so every token names its origin.
std::vector<std::vector<int32_t>> make_documents(int count) {
  std::vector<std::vector<int32_t>> docs;
  for (int d = 0; d < count; ++d) {
    std::vector<int32_t> doc;
    for (int i = 0; i < 5 + (d * 7) % 23; ++i) doc.push_back(d * 100 + i);
    docs.push_back(doc);
  }
  return docs;
}

std::string write_dataset(const std::string& prefix, const std::vector<std::vector<int32_t>>& docs, int64_t vocab) {
  IndexedDatasetWriter writer(prefix, vocab);
  for (const auto& doc : docs) writer.add_document(doc);
  writer.finalize();
  return prefix;
}

void flip_byte(const std::string& path, size_t offset) {
  std::fstream file(path, std::ios::in | std::ios::out | std::ios::binary);
  file.seekg(static_cast<std::streamoff>(offset));
  char c;
  file.get(c);
  file.seekp(static_cast<std::streamoff>(offset));
  file.put(static_cast<char>(c ^ 0x5A));
}

using fmoe::testing::expect_error_mentions;

TEST(Corpus, DictdNumbersAndWhitespace) {
  EXPECT_EQ(decode_dictd_number("A"), 0u);
  EXPECT_EQ(decode_dictd_number("B"), 1u);
  EXPECT_EQ(decode_dictd_number("BA"), 64u);
  EXPECT_EQ(decode_dictd_number("/"), 63u);
  EXPECT_EQ(decode_dictd_number("5I"), 57u * 64 + 8);
  EXPECT_THROW(decode_dictd_number("A*"), std::runtime_error);
  EXPECT_EQ(collapse_whitespace("  a\n  b\t\tc  "), "a b c");
}

TEST_F(TempDir, TextDocumentsSplitAtBlankLines) {
  std::ofstream(path("t.txt")) << "first line\nsecond\n\nnext  doc\n\n\n";
  const auto docs = read_text_documents(path("t.txt"));
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(docs[0], "first line second");
  EXPECT_EQ(docs[1], "next doc");
}

TEST_F(TempDir, DatasetRoundTripInMegatronLayout) {
  const auto docs = make_documents(50);
  const auto prefix = write_dataset(path("ds"), docs, 6000);
  const auto dataset = IndexedDataset::open(prefix);
  ASSERT_EQ(dataset->num_documents(), 50);
  EXPECT_EQ(dataset->dtype(), TokenDtype::kUInt16);
  EXPECT_EQ(dataset->vocab_size(), 6000);
  int64_t total = 0;
  for (int d = 0; d < 50; ++d) {
    ASSERT_EQ(dataset->document_length(d), static_cast<int64_t>(docs[d].size()));
    std::vector<int64_t> out(docs[d].size());
    dataset->copy_tokens(d, 0, static_cast<int64_t>(out.size()), out.data());
    for (size_t i = 0; i < out.size(); ++i) ASSERT_EQ(out[i], docs[d][i]);
    total += static_cast<int64_t>(docs[d].size());
  }
  EXPECT_EQ(dataset->num_tokens(), total);
  // The MMIDIDX header: magic, version 1, dtype code 8 (uint16).
  const std::string idx = read_file(prefix + ".idx");
  EXPECT_EQ(idx.substr(0, 7), "MMIDIDX");
  EXPECT_EQ(static_cast<uint8_t>(idx[17]), 8);
  EXPECT_EQ(idx.size(), 34u + 50 * 12 + 51 * 8);
}

TEST_F(TempDir, LargeVocabularyUsesInt32) {
  const auto prefix = write_dataset(path("big"), {{70000, 1, 2}}, 80000);
  const auto dataset = IndexedDataset::open(prefix);
  EXPECT_EQ(dataset->dtype(), TokenDtype::kInt32);
  std::vector<int64_t> out(3);
  dataset->copy_tokens(0, 0, 3, out.data());
  EXPECT_EQ(out[0], 70000);
}

TEST_F(TempDir, WriterRejectsTokensOutsideVocabulary) {
  IndexedDatasetWriter writer(path("bad"), 10);
  EXPECT_THROW(writer.add_document({3, 10}), std::runtime_error);
}

TEST_F(TempDir, TruncatedOrCorruptDatasetIsRefusedByName) {
  const auto prefix = write_dataset(path("ds"), make_documents(20), 6000);
  // Corrupt token payload: caught by the checksum.
  flip_byte(prefix + ".bin", 10);
  expect_error_mentions([&] { IndexedDataset::open(prefix); }, prefix + ".bin");
  write_dataset(prefix, make_documents(20), 6000);
  // Truncated token file.
  fs::resize_file(prefix + ".bin", fs::file_size(prefix + ".bin") - 3);
  expect_error_mentions([&] { IndexedDataset::open(prefix); }, prefix + ".bin: truncated");
  write_dataset(prefix, make_documents(20), 6000);
  // Truncated index.
  fs::resize_file(prefix + ".idx", fs::file_size(prefix + ".idx") - 8);
  expect_error_mentions([&] { IndexedDataset::open(prefix); }, prefix + ".idx");
  // Not an index at all.
  std::ofstream(prefix + ".idx") << "garbage";
  expect_error_mentions([&] { IndexedDataset::open(prefix); }, "bad magic");
  // Missing files.
  expect_error_mentions([&] { IndexedDataset::open(path("nope")); }, path("nope") + ".idx");
}

TEST_F(TempDir, MegatronDatasetWithoutMetadataLoads) {
  const auto prefix = write_dataset(path("ds"), make_documents(5), 6000);
  fs::remove(prefix + ".meta.json");
  const auto dataset = IndexedDataset::open(prefix);
  EXPECT_EQ(dataset->num_documents(), 5);
  EXPECT_EQ(dataset->vocab_size(), 0);
}

TEST(Loader, PermutationIsABijectionAndSeeded) {
  const auto a = seeded_permutation(1000, 7);
  auto sorted = a;
  std::sort(sorted.begin(), sorted.end());
  for (int64_t i = 0; i < 1000; ++i) ASSERT_EQ(sorted[static_cast<size_t>(i)], i);
  EXPECT_EQ(a, seeded_permutation(1000, 7));
  EXPECT_NE(a, seeded_permutation(1000, 8));
}

TEST_F(TempDir, LoaderIsDeterministicAndCoversAnEpoch) {
  const auto docs = make_documents(400);
  const auto dataset = IndexedDataset::open(write_dataset(path("ds"), docs, 60000));
  LoaderOptions options;
  options.seq_len = 8;
  options.micro_batch_size = 4;
  options.num_micro_batches = 2;
  options.dp_size = 2;
  options.seed = 99;
  options.val_fraction = 0.1;
  const TokenLoader loader(dataset, options);
  const TokenLoader again(dataset, options);
  EXPECT_TRUE(at::equal(loader.train_batch(3, 1, 1), again.train_batch(3, 1, 1)));
  EXPECT_FALSE(at::equal(loader.train_batch(3, 1, 1), loader.train_batch(3, 1, 0)));
  // A fresh loader asked out of order gives the same batch (no hidden state).
  EXPECT_TRUE(at::equal(TokenLoader(dataset, options).train_batch(7, 0, 1), loader.train_batch(7, 0, 1)));
  EXPECT_EQ(loader.train_batch(0, 0, 0).sizes(), (std::vector<int64_t>{4, 9}));

  // One epoch visits every window start exactly once.
  const int64_t windows = loader.num_train_windows();
  std::set<int64_t> firsts;
  const int64_t rows_per_step = 4 * 2 * 2;
  for (int64_t step = 0; step * rows_per_step < windows; ++step) {
    for (int64_t micro = 0; micro < 2; ++micro) {
      for (int64_t rank = 0; rank < 2; ++rank) {
        const at::Tensor batch = loader.train_batch(step, micro, rank);
        for (int64_t r = 0; r < 4; ++r) firsts.insert(batch[r][0].item<int64_t>() * 1000 + batch[r][1].item<int64_t>());
      }
    }
  }
  EXPECT_GE(static_cast<int64_t>(firsts.size()), windows - 1);

  // Validation windows come only from validation documents.
  for (int64_t b = 0; b < 3; ++b) {
    const at::Tensor batch = loader.val_batch(b);
    for (int64_t r = 0; r < 4; ++r) {
      const int64_t doc = batch[r][0].item<int64_t>() / 100;
      EXPECT_TRUE(is_validation_document(doc, options.split_seed, options.val_fraction)) << doc;
    }
  }
  // Windows are contiguous runs of the stream: within a document, consecutive ids.
  const at::Tensor batch = loader.train_batch(0, 0, 0);
  for (int64_t r = 0; r < 4; ++r) {
    for (int64_t i = 1; i < 9; ++i) {
      const int64_t prev = batch[r][i - 1].item<int64_t>(), cur = batch[r][i].item<int64_t>();
      if (cur / 100 == prev / 100) {
        EXPECT_EQ(cur, prev + 1);
      }
    }
  }
}

TEST(Loader, ValidationSplitFollowsFraction) {
  int held_out = 0;
  for (int64_t d = 0; d < 100000; ++d) held_out += is_validation_document(d, 5, 0.05);
  EXPECT_NEAR(held_out / 100000.0, 0.05, 0.005);
}

TEST_F(TempDir, TokenizerTrainsRoundTripsAndRefusesCorruption) {
  std::vector<std::string> docs;
  for (int i = 0; i < 300; ++i) {
    docs.push_back("The quick brown fox " + std::to_string(i) + " jumps over the lazy dog; a dictionary entry, defined.");
  }
  TokenizerTrainOptions options;
  options.vocab_size = 300;
  options.num_threads = 1;
  const std::string model = path("tok.model");
  train_tokenizer(docs, model, options);
  const Tokenizer tokenizer = Tokenizer::load(model);
  EXPECT_EQ(tokenizer.vocab_size(), 300);
  EXPECT_EQ(tokenizer.eos_id(), 2);
  const std::string text = "The lazy fox jumps; Ω unseen";  // byte fallback covers unseen characters
  EXPECT_EQ(tokenizer.decode(tokenizer.encode(text)), text);

  flip_byte(model, 40);
  expect_error_mentions([&] { Tokenizer::load(model); }, model + ": checksum mismatch");
  fs::remove(model + ".meta.json");
  fs::resize_file(model, fs::file_size(model) / 2);
  expect_error_mentions([&] { Tokenizer::load(model); }, model);
}

}  // namespace
