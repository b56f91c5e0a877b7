// LibTorch's CUDA backend, loaded on demand by binaries that link only its CPU
// library (moe-train): after parallel::load_cuda_backend() LibTorch's CUDA hooks
// are the real ones. LibTorch fixes its hooks at the first query (at::manual_seed
// queries them), so the load must come first; this binary queries nothing
// before the test. Runs wherever the CUDA build of LibTorch is installed; skips
// where its CUDA library cannot be loaded (a CPU-only LibTorch).
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <ATen/detail/CUDAHooksInterface.h>

#include "parallel/device.h"

namespace {

TEST(CudaBackend, LoadingBeforeTheFirstQueryRegistersTheRealHooks) {
  if (!fmoe::parallel::load_cuda_backend()) GTEST_SKIP() << "SKIPPED: " << fmoe::parallel::cuda_load_error();
  EXPECT_TRUE(fmoe::parallel::cuda_load_error().empty());
  // The CPU stub throws here ("Cannot query CUDART version without ATen_cuda library").
  EXPECT_GE(at::detail::getCUDAHooks().versionCUDART(), 12000);
  // Asked for by name, CUDA is loaded (and counted) even where no driver is seen.
  const int devices = fmoe::parallel::visible_cuda_devices(/*always_load=*/true);
  EXPECT_EQ(devices, at::detail::getCUDAHooks().deviceCount());
  // Seeding after the load keeps the real hooks.
  at::manual_seed(0);
  EXPECT_GE(at::detail::getCUDAHooks().versionCUDART(), 12000);
}

}  // namespace
