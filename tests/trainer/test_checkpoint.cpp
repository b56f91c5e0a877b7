#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <ATen/ATen.h>

#include <filesystem>
#include <fstream>

#include "data/file_util.h"
#include "trainer/checkpoint.h"
#include "trainer/safetensors.h"

namespace {

namespace fs = std::filesystem;
using namespace fmoe::trainer;

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
  const std::string bytes = fmoe::data::read_file(path);
  EXPECT_EQ(bytes, to_safetensors(tensors, {{"format", "pt"}}));
  EXPECT_EQ(crc, fmoe::data::crc32_of(bytes));
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
    fmoe::data::AtomicFileWriter writer(dir_ + "/never");
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
  const std::string index = fmoe::data::read_file(*latest + "/index.json");
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
