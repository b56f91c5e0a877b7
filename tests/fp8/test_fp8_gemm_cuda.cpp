// FP8 linear on a CUDA device: whichever GEMM the probe picks (native
// at::_scaled_mm with block scales, or the emulation) must agree with the CPU
// emulation; on Hopper (sm_90) the probe must pick the native GEMM. Shapes are
// multiples of 512 so that every product of the layer (forward, input and weight
// gradients) takes the native path there. Skips where there is no CUDA device;
// runs under scripts/gpu_check.sh.
#include <gtest/gtest.h>

#include <ATen/cuda/CUDAContext.h>
#include <torch/torch.h>

#include "fp8/fp8_gemm.h"
#include "moe/linear.h"

namespace {

TEST(Fp8GemmCuda, LinearMatchesCpuEmulation) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "SKIPPED: no CUDA device";
  const at::Device cuda(at::kCUDA, 0);
  const std::string backend = fmoe::fp8::fp8_gemm_backend(cuda);
  std::printf("fp8 GEMM backend: %s\n", backend.c_str());
  if (at::cuda::getDeviceProperties(0)->major == 9) {
    EXPECT_EQ(backend.rfind("native", 0), 0u) << "sm_90 should take at::_scaled_mm with block scales: " << backend;
  }
  // FP32 output agrees with the emulation to FP32 rounding; BF16 output to BF16's.
  const double tolerance = backend.find("BF16 output") == std::string::npos ? 1e-3 : 1e-2;
  torch::manual_seed(0);
  const at::Tensor x = at::randn({512, 512});
  const at::Tensor w = at::randn({512, 512}) * 0.05;
  const at::Tensor dy = at::randn({512, 512});
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
    EXPECT_LT(rel, tolerance) << "output " << i;
  }
}

}  // namespace
