#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>

#include "common/file_util.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/safetensors.h"

namespace {

namespace fs = std::filesystem;

using namespace fmoe::checkpoint;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = (fs::temp_directory_path() / ("fmoe_ckpt_" + std::to_string(::getpid()) + "_" +
                                         ::testing::UnitTest::GetInstance()->current_test_info()->name())).string();
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  CheckpointContents contents(int64_t step) const {
    CheckpointContents c;
    c.model["layers.0.w"] = at::arange(12, at::kFloat).view({3, 4}) * static_cast<float>(step);
    c.model["bias"] = at::tensor({1.5f, -2.0f}).to(at::kBFloat16);
    c.optimizer["exp_avg.layers.0.w"] = at::ones({3, 4});
    c.optimizer["optimizer_steps"] = at::full({}, step, at::kLong);
    c.state.step = step;
    c.state.tokens_seen = step * 100;
    c.state.loader_seed = 7;
    c.config_yaml = "model: {}\n";
    return c;
  }
  std::string dir_;
};

using fmoe::testing::expect_error_mentions;

TEST(Safetensors, RoundTripAllDtypes) {
  TensorMap tensors = {{"f32", at::randn({2, 3})},          {"bf16", at::randn({5}).to(at::kBFloat16)},
                       {"i64", at::arange(4, at::kLong)},   {"u8", at::tensor({1, 2, 255}).to(at::kByte)},
                       {"scalar", at::full({}, 3.0, at::kDouble)}, {"t", at::randn({3, 2}).t()}};
  const std::string bytes = to_safetensors(tensors, {{"format", "pt"}});
  uint64_t header = 0;
  std::memcpy(&header, bytes.data(), 8);
  EXPECT_EQ((8 + header) % 8, 0u);
  const TensorMap back = from_safetensors(bytes, "x.safetensors");
  ASSERT_EQ(back.size(), tensors.size());
  for (const auto& [name, t] : tensors) {
    EXPECT_TRUE(at::equal(back.at(name), t.contiguous())) << name;
    EXPECT_EQ(back.at(name).scalar_type(), t.scalar_type());
  }
  expect_error_mentions([&] { from_safetensors(bytes.substr(0, bytes.size() - 4), "x.safetensors"); }, "x.safetensors: tensor");
  expect_error_mentions([&] { from_safetensors(bytes.substr(0, 5), "y.safetensors"); }, "y.safetensors: truncated");
}

TEST_F(CheckpointTest, StreamedFilesEqualInMemoryBytesAndReadBack) {
  fs::create_directories(dir_);
  TensorMap tensors = {{"a", at::randn({7, 3})}, {"b", at::arange(5, at::kLong)}, {"c", at::randn({4}).to(at::kBFloat16)},
                       {"strided", at::randn({3, 2}).t()}};
  const std::string path = dir_ + "/s.safetensors";
  const uint32_t crc = write_safetensors(path, tensors, {{"format", "pt"}});
  const std::string bytes = fmoe::common::read_file(path);
  EXPECT_EQ(bytes, to_safetensors(tensors, {{"format", "pt"}}));
  EXPECT_EQ(crc, fmoe::common::crc32_of(bytes));
  EXPECT_FALSE(fs::exists(path + ".tmp"));
  uint32_t read_crc = 0;
  const TensorMap back = read_safetensors(path, &read_crc);
  EXPECT_EQ(read_crc, crc);
  ASSERT_EQ(back.size(), tensors.size());
  for (const auto& [name, t] : tensors) EXPECT_TRUE(at::equal(back.at(name), t.contiguous())) << name;
  fs::resize_file(path, bytes.size() - 3);
  expect_error_mentions([&] { read_safetensors(path); }, path + ": tensor");
  {
    // A writer dropped before commit leaves nothing behind.
    fmoe::common::AtomicFileWriter writer(dir_ + "/never");
    writer.append("partial");
  }
  EXPECT_FALSE(fs::exists(dir_ + "/never"));
  EXPECT_FALSE(fs::exists(dir_ + "/never.tmp"));
}

TEST_F(CheckpointTest, KeepEveryKeepsMultiplesForGoodBesideTheNewest) {
  for (int64_t step : {10, 20, 30, 40, 50, 60, 70}) save_checkpoint(dir_, contents(step), 2, /*keep_every=*/30);
  std::vector<std::string> names;
  for (const std::string& dir : complete_checkpoints(dir_)) names.push_back(fs::path(dir).filename().string());
  EXPECT_EQ(names, (std::vector<std::string>{"step_00000030", "step_00000050", "step_00000060", "step_00000070"}));
  // What resume tries: the latest, then the others newest first.
  std::vector<std::string> order;
  for (const std::string& dir : resume_candidates(dir_)) order.push_back(fs::path(dir).filename().string());
  EXPECT_EQ(order, (std::vector<std::string>{"step_00000070", "step_00000060", "step_00000050", "step_00000030"}));
}

TEST_F(CheckpointTest, SaveLoadLatestAndRetention) {
  EXPECT_FALSE(latest_checkpoint(dir_).has_value());
  for (int64_t step : {10, 20, 30}) save_checkpoint(dir_, contents(step), 2);
  const auto latest = latest_checkpoint(dir_);
  ASSERT_TRUE(latest.has_value());
  EXPECT_EQ(fs::path(*latest).filename(), "step_00000030");
  EXPECT_FALSE(fs::exists(dir_ + "/checkpoints/step_00000010"));  // only the newest two are kept
  EXPECT_TRUE(fs::exists(dir_ + "/checkpoints/step_00000020"));
  const CheckpointContents back = load_checkpoint(*latest);
  EXPECT_EQ(back.state.step, 30);
  EXPECT_EQ(back.state.tokens_seen, 3000);
  EXPECT_TRUE(at::equal(back.model.at("layers.0.w"), contents(30).model.at("layers.0.w")));
  EXPECT_TRUE(at::equal(back.model.at("bias"), contents(30).model.at("bias")));
  EXPECT_EQ(back.config_yaml, "model: {}\n");
  // The index describes every tensor with its global shape and slice.
  const std::string index = fmoe::common::read_file(*latest + "/index.json");
  EXPECT_NE(index.find("\"layers.0.w\""), std::string::npos);
  EXPECT_NE(index.find("\"slice\""), std::string::npos);
}

TEST_F(CheckpointTest, CorruptOrTruncatedFilesAreRefusedByName) {
  const std::string ckpt = save_checkpoint(dir_, contents(5), 2);
  const std::string model = ckpt + "/model.safetensors";
  fs::resize_file(model, fs::file_size(model) - 1);
  expect_error_mentions([&] { load_checkpoint(ckpt); }, model + ": checksum mismatch");
  std::ofstream(ckpt + "/trainer_state.json") << "{ not json";
  expect_error_mentions([&] { load_checkpoint(ckpt); }, ckpt + "/trainer_state.json: corrupt");
  fs::remove(ckpt + "/trainer_state.json");
  expect_error_mentions([&] { load_checkpoint(ckpt); }, "not a complete checkpoint");
}

}  // namespace

namespace {

// Rows of a tensor larger than a chunk: the reader returns exactly those rows,
// reads about their bytes (plus the rest of the chunks they touch, to check
// them), and a flipped byte inside a chunk it touches is reported with the file,
// while one in a chunk it does not touch is not read at all.
TEST_F(CheckpointTest, ReadsRowsAndChecksOnlyTheChunksTheyTouch) {
  CheckpointContents c = contents(3);
  const int64_t rows = 16, cols = (int64_t{3} << 20) / 4;  // 16 rows of 3 MiB (FP32): 48 MiB, 12 chunks of 4 MiB
  c.model["experts"] = at::arange(rows * cols, at::kFloat).view({rows, cols});
  const std::string saved = save_checkpoint(dir_, c, 2);
  {
    const CheckpointContents loaded = load_checkpoint(saved, /*read_tensors=*/false);
    EXPECT_TRUE(loaded.model.empty());
    const CheckpointTensors tensors(saved, loaded);
    EXPECT_EQ(tensors.shape("experts"), (std::vector<int64_t>{rows, cols}));
    EXPECT_EQ(tensors.dtype("bias"), at::kBFloat16);
    const at::Tensor part = tensors.read_rows("experts", {rows, cols}, 4, 8);  // rows 4-7: bytes [12, 24) MiB, chunks 3-5
    EXPECT_TRUE(at::equal(part, c.model["experts"].narrow(0, 4, 4)));
    EXPECT_EQ(tensors.bytes_read(), size_t{12} << 20);  // chunk-aligned here: nothing beyond the rows
    const at::Tensor odd = tensors.read_rows("experts", {rows * 3, cols / 3}, 1, 2);  // 1 MiB inside chunk 0
    EXPECT_TRUE(at::equal(odd.view({-1}), c.model["experts"].view({-1}).narrow(0, cols / 3, cols / 3)));
    EXPECT_EQ(tensors.bytes_read(), (size_t{12} << 20) + (size_t{4} << 20));  // the whole of chunk 0 to check it
    EXPECT_TRUE(at::equal(tensors.read("layers.0.w"), c.model["layers.0.w"]));
    EXPECT_EQ(tensors.read("optimizer_steps").item<int64_t>(), 3);
  }
  // Damage inside row 12 (chunk 9): rows 4-7 still read, rows 12-13 are refused naming the file.
  const std::string file = saved + "/model.safetensors";
  const SafetensorsFile layout(file);
  const uint64_t at_byte = layout.entries().at("experts").begin + (uint64_t{12} * cols * 4) + 1000;
  {
    std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
    f.seekg(static_cast<std::streamoff>(at_byte));
    char byte = 0;
    f.read(&byte, 1);
    byte ^= 0x20;
    f.seekp(static_cast<std::streamoff>(at_byte));
    f.write(&byte, 1);
  }
  const CheckpointTensors tensors(saved, load_checkpoint(saved, /*read_tensors=*/false));
  EXPECT_TRUE(at::equal(tensors.read_rows("experts", {rows, cols}, 4, 8), c.model["experts"].narrow(0, 4, 4)));
  try {
    tensors.read_rows("experts", {rows, cols}, 12, 14);
    FAIL() << "damaged rows were read";
  } catch (const std::runtime_error& e) {
    EXPECT_EQ(std::string(e.what()), file + ": checksum mismatch: the file is truncated or corrupt");
  }
}

}  // namespace
