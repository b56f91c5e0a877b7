// Device placement and the step's host reads, on any machine (GPU runs are
// checked by scripts/gpu_check.sh).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cstdlib>

#include "parallel/device.h"
#include "trainer/step_readback.h"

namespace {

using fmoe::parallel::choose_device;
using fmoe::parallel::DeviceChoice;

TEST(Device, AutoTakesTheCpuWithoutAGpu) {
  const DeviceChoice choice = choose_device("auto", 3, 0);
  EXPECT_TRUE(choice.device.is_cpu());
  EXPECT_EQ(choice.message, "device auto -> cpu (no CUDA device visible)");
  EXPECT_TRUE(choose_device("cpu", 0, 8).device.is_cpu());
}

TEST(Device, EachLocalRankTakesGpuLocalRankModuloCount) {
  EXPECT_EQ(choose_device("auto", 0, 8).device, c10::Device(c10::kCUDA, 0));
  EXPECT_EQ(choose_device("cuda", 5, 8).device, c10::Device(c10::kCUDA, 5));
  // More ranks than GPUs on a machine: they share, round-robin.
  EXPECT_EQ(choose_device("cuda", 5, 4).device, c10::Device(c10::kCUDA, 1));
  EXPECT_EQ(choose_device("cuda", 3, 1).device, c10::Device(c10::kCUDA, 0));
  EXPECT_EQ(choose_device("auto", 2, 4).message, "device auto -> cuda:2 (local rank 2, 4 GPUs visible)");
}

TEST(Device, CudaWithoutAGpuAndUnknownNamesAreRefusedByKey) {
  try {
    choose_device("cuda", 0, 0);
    FAIL() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_EQ(std::string(e.what()).rfind("training.device: cuda requested but no CUDA device is visible", 0), 0u) << e.what();
  }
  EXPECT_THROW(choose_device("gpu", 0, 1), std::invalid_argument);
}

TEST(Device, LocalRankComesFromTheLauncher) {
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) unsetenv(name);
  EXPECT_EQ(fmoe::parallel::launcher_local_rank(), 0);
  setenv("LOCAL_RANK", "2", 1);
  EXPECT_EQ(fmoe::parallel::launcher_local_rank(), 2);
  setenv("SLURM_LOCALID", "5", 1);  // Slurm's wins over the generic name
  EXPECT_EQ(fmoe::parallel::launcher_local_rank(), 5);
  setenv("OMPI_COMM_WORLD_LOCAL_RANK", "7", 1);  // mpirun's wins over both
  EXPECT_EQ(fmoe::parallel::launcher_local_rank(), 7);
  for (const char* name : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"}) unsetenv(name);
}

TEST(Device, CpuHasNoDeviceMemoryToReport) {
  EXPECT_EQ(fmoe::parallel::peak_device_memory_bytes(c10::Device(c10::kCPU)), 0);
  EXPECT_FALSE(fmoe::parallel::pinned_memory_available(c10::Device(c10::kCPU)));
}

TEST(StepReadback, OneCopyReturnsEverythingInOrder) {
  fmoe::trainer::StepReadback readback;
  const int64_t before = fmoe::trainer::StepReadback::copies();
  EXPECT_EQ(readback.add(at::tensor({1.5, 2.5, 3.5}, at::kDouble)), 0u);
  EXPECT_EQ(readback.add(at::full({}, 7L, at::kLong)), 3u);
  EXPECT_EQ(readback.add(at::tensor({0.25f, -1.0f}).view({1, 2})), 4u);
  const std::vector<double> values = readback.read();
  EXPECT_EQ(values, (std::vector<double>{1.5, 2.5, 3.5, 7.0, 0.25, -1.0}));
  EXPECT_EQ(fmoe::trainer::StepReadback::copies(), before + 1);
  // The packet starts empty again; reading nothing copies nothing.
  EXPECT_TRUE(readback.read().empty());
  EXPECT_EQ(fmoe::trainer::StepReadback::copies(), before + 1);
}

// The step's scalars in the order the step adds them: losses (ce, aux, z, one per
// MTP depth), the gradient norm, (max, mean, busiest rank over mean) per MoE
// layer, then the attention layers' largest logits and the heads clipped.
TEST(StepScalars, UnpackNamesEachValueAndRefusesAWrongCount) {
  const std::vector<double> values = {2.0, 0.1, 0.01, 2.5, 0.75, 30, 8, 1.25, 40, 8, 1.5, 9.0, 11.0, 3};
  const auto s = fmoe::trainer::StepScalars::unpack(values, /*mtp_depth=*/1, /*moe_layers=*/2, /*logit_layers=*/2);
  EXPECT_EQ(s.loss, 2.0);
  EXPECT_EQ(s.aux_loss, 0.1);
  EXPECT_EQ(s.z_loss, 0.01);
  EXPECT_EQ(s.mtp_losses, std::vector<double>{2.5});
  EXPECT_EQ(s.grad_norm, 0.75);
  EXPECT_EQ(s.load_max, (std::vector<double>{30, 40}));
  EXPECT_EQ(s.load_mean, (std::vector<double>{8, 8}));
  EXPECT_EQ(s.load_rank_imbalance, (std::vector<double>{1.25, 1.5}));
  EXPECT_EQ(s.max_logits, (std::vector<double>{9.0, 11.0}));
  EXPECT_EQ(s.clipped_heads, 3);
  EXPECT_THROW(fmoe::trainer::StepScalars::unpack(values, 1, 3, 2), std::logic_error);
}

}  // namespace
