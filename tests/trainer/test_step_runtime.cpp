// The step as the execution of a one-stage schedule: the same gradients and
// losses as the plain gradient-accumulation loop, bit for bit; the hooks see
// every micro-batch and exactly one last backward; a schedule of several
// pipeline ranks is refused.
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <torch/torch.h>

#include "moe/model.h"
#include "trainer/step_runtime.h"

namespace {

using namespace fmoe;

moe::ModelConfig micro_model() {
  moe::ModelConfig c = fmoe::testing::test_model({.vocab = 64, .hidden = 32, .layers = 2, .heads = 2, .kv_heads = 2, .head_dim = 16, .ffn = 64, .experts = 4, .top_k = 2, .moe_ffn = 16});
  return c;
}

TEST(StepRuntime, OneStageScheduleIsTheAccumulationLoop) {
  const int micro_batches = 3;
  torch::manual_seed(5);
  std::vector<at::Tensor> batches;
  for (int i = 0; i < micro_batches; ++i) batches.push_back(at::randint(0, 64, {2, 9}, at::kLong));

  torch::manual_seed(1);
  moe::MoEModel reference(micro_model());
  at::Tensor expected_losses = at::zeros({3}, at::kDouble);
  for (const at::Tensor& b : batches) {
    const moe::ModelOutput out = reference.forward(b, at::kFloat);
    (out.loss / static_cast<double>(micro_batches)).backward();
    expected_losses += at::stack({out.ce_loss, out.aux_loss, out.z_loss}).to(at::kDouble);
  }

  torch::manual_seed(1);
  moe::MoEModel model(micro_model());
  trainer::StepRuntime runtime(model, parallel::make_schedule("1f1b", 1, 1, micro_batches));
  std::vector<int64_t> asked;
  int last_backwards = 0, backwards = 0;
  trainer::StepHooks hooks;
  hooks.batch = [&](int64_t micro) {
    asked.push_back(micro);
    return batches[static_cast<size_t>(micro)];
  };
  hooks.before_backward = [&](bool last) {
    ++backwards;
    last_backwards += last ? 1 : 0;
    EXPECT_EQ(last, backwards == micro_batches);
  };
  const trainer::StepTotals totals = runtime.run(hooks, at::kFloat, /*fp8=*/false);
  EXPECT_EQ(asked, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_EQ(last_backwards, 1);
  EXPECT_TRUE(at::equal(totals.losses, expected_losses));
  const auto got = model.named_parameters(), want = reference.named_parameters();
  for (const auto& item : want) EXPECT_TRUE(at::equal(got[item.key()].grad(), item.value().grad())) << item.key();
}

TEST(StepRuntime, SeveralPipelineRanksAreRefused) {
  moe::MoEModel model(micro_model());
  EXPECT_THROW(trainer::StepRuntime(model, parallel::make_schedule("1f1b", 2, 1, 4)), std::invalid_argument);
}

}  // namespace
