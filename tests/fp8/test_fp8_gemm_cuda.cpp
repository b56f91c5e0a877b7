// FP8 linear on a CUDA device: whichever GEMM the probe picks (native
// at::_scaled_mm with block scales, or the emulation) must agree with the CPU
// emulation. Skips where there is no CUDA device; runs under scripts/gpu_check.sh.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "fp8/fp8_gemm.h"
#include "moe/linear.h"

namespace {

TEST(Fp8GemmCuda, LinearMatchesCpuEmulation) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "SKIPPED: no CUDA device";
  const at::Device cuda(at::kCUDA, 0);
  std::printf("fp8 GEMM backend: %s\n", fmoe::fp8::fp8_gemm_backend(cuda).c_str());
  torch::manual_seed(0);
  const at::Tensor x = at::randn({512, 384});
  const at::Tensor w = at::randn({256, 384}) * 0.05;
  const at::Tensor dy = at::randn({512, 256});
  std::vector<at::Tensor> results;
  for (const at::Device& device : {at::Device(at::kCPU), cuda}) {
    const at::Tensor xd = x.to(device).requires_grad_(), wd = w.to(device).requires_grad_();
    const at::Tensor y = fmoe::moe::deferrable_linear(xd, wd, /*fp8=*/true);
    const auto grads = torch::autograd::grad({y}, {xd, wd}, {dy.to(device)});
    results.push_back(y.cpu());
    results.push_back(grads[0].cpu());
    results.push_back(grads[1].cpu());
  }
  for (int i = 0; i < 3; ++i) {
    const double rel = ((results[3 + i] - results[i]).norm() / results[i].norm()).item<double>();
    EXPECT_LT(rel, 1e-3) << "output " << i;
  }
}

}  // namespace
