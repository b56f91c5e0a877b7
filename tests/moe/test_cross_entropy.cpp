#include <gtest/gtest.h>

#include <torch/torch.h>

#include "moe/cross_entropy.h"

namespace {

TEST(ChunkedCrossEntropy, MatchesLibTorchLossAndGradient) {
  torch::manual_seed(2);
  for (int64_t chunk : {1, 7, 32, 1000}) {
    const at::Tensor logits = (at::randn({50, 37}, at::kDouble) * 3).requires_grad_();
    const at::Tensor targets = at::randint(37, {50}, at::kLong);
    const at::Tensor loss = fmoe::moe::chunked_cross_entropy(logits.to(at::kFloat), targets, chunk);
    const at::Tensor reference = at::cross_entropy_loss(logits, targets);
    EXPECT_NEAR(loss.item<double>(), reference.item<double>(), 1e-5);
    const at::Tensor grad = torch::autograd::grad({loss * 2.5}, {logits})[0];
    const at::Tensor grad_ref = torch::autograd::grad({reference * 2.5}, {logits})[0];
    EXPECT_LT(((grad - grad_ref).abs().max()).item<double>(), 1e-6) << "chunk " << chunk;
  }
}

TEST(ChunkedCrossEntropy, Bf16LogitsKeepFp32LossAndBf16Gradient) {
  torch::manual_seed(3);
  const at::Tensor master = at::randn({64, 300}).requires_grad_();
  const at::Tensor targets = at::randint(300, {64}, at::kLong);
  const at::Tensor logits = master.to(at::kBFloat16);
  const at::Tensor loss = fmoe::moe::chunked_cross_entropy(logits, targets);
  EXPECT_EQ(loss.scalar_type(), at::kFloat);
  // Exact FP32 loss of the BF16 values: not rounded to BF16.
  const double reference = at::cross_entropy_loss(logits.detach().to(at::kDouble), targets).item<double>();
  EXPECT_NEAR(loss.item<double>(), reference, 1e-5);
  const at::Tensor grad = torch::autograd::grad({loss}, {master})[0];
  const at::Tensor grad_ref = torch::autograd::grad({at::cross_entropy_loss(master.to(at::kBFloat16).to(at::kFloat), targets)}, {master})[0];
  EXPECT_LT(((grad - grad_ref).abs().max()).item<double>(), 1e-4);
}

}  // namespace
