// The emulated FP8 GEMMs do not depend on the run's precision: their operands are
// quantized in FP32 and multiplied by the FP32 GEMM whether the activations
// around them are BF16 or FP32, so a machine whose BF16 GEMM is slow (AVX2) and
// one where it is fast compute the same FP8 products. Checked bit for bit.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include "fp8/fp8_gemm.h"
#include "moe/grouped_swiglu.h"
#include "moe/linear.h"

namespace {

using namespace fmoe;

// Values exactly representable in BF16, so the BF16 and FP32 runs start equal.
at::Tensor bf16_values(std::vector<int64_t> shape, double scale) { return (at::randn(shape) * scale).to(at::kBFloat16).to(at::kFloat); }

TEST(Fp8Emulation, LinearIsIdenticalOnBf16AndFp32Activations) {
  torch::manual_seed(7);
  const at::Tensor x = bf16_values({192, 256}, 1.0), dy = bf16_values({192, 384}, 0.1);
  const at::Tensor w = at::randn({384, 256}) * 0.05;
  at::Tensor x32 = x.clone().requires_grad_(true), xb = x.to(at::kBFloat16).requires_grad_(true);
  at::Tensor w32 = w.clone().requires_grad_(true), wb = w.clone().requires_grad_(true);
  const at::Tensor y32 = moe::deferrable_linear(x32, w32, true), yb = moe::deferrable_linear(xb, wb, true);
  ASSERT_EQ(yb.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(y32.to(at::kBFloat16), yb));
  y32.backward(dy);
  yb.backward(dy.to(at::kBFloat16));
  EXPECT_TRUE(at::equal(x32.grad().to(at::kBFloat16), xb.grad()));
  EXPECT_TRUE(at::equal(w32.grad(), wb.grad()));  // FP32 either way, bit for bit
  EXPECT_GT(w32.grad().abs().sum().item<double>(), 0);
}

TEST(Fp8Emulation, GroupedExpertsAreIdenticalOnBf16AndFp32Activations) {
  torch::manual_seed(11);
  const std::vector<int64_t> rows = {64, 0, 100, 28};
  const at::Tensor x = bf16_values({192, 128}, 1.0), dy = bf16_values({192, 128}, 0.1);
  const at::Tensor w13 = at::randn({4, 128, 256}) * 0.05, w2 = at::randn({4, 128, 128}) * 0.05;
  at::Tensor x32 = x.clone().requires_grad_(true), xb = x.to(at::kBFloat16).requires_grad_(true);
  at::Tensor a13 = w13.clone().requires_grad_(true), b13 = w13.clone().requires_grad_(true);
  at::Tensor a2 = w2.clone().requires_grad_(true), b2 = w2.clone().requires_grad_(true);
  const at::Tensor y32 = moe::grouped_swiglu(x32, a13, a2, rows, /*fp8=*/true);
  const at::Tensor yb = moe::grouped_swiglu(xb, b13, b2, rows, /*fp8=*/true);
  EXPECT_TRUE(at::equal(y32.to(at::kBFloat16), yb));
  y32.backward(dy);
  yb.backward(dy.to(at::kBFloat16));
  EXPECT_TRUE(at::equal(x32.grad().to(at::kBFloat16), xb.grad()));
  EXPECT_TRUE(at::equal(a13.grad(), b13.grad()));
  EXPECT_TRUE(at::equal(a2.grad(), b2.grad()));
}

}  // namespace
