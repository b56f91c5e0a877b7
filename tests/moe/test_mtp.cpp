// Multi-token prediction: the modules' parameter count equals the config
// arithmetic; depth k's loss equals a by-hand recomputation from the module's
// pieces (embedding of tokens i + k, the previous depth's hidden state at i,
// targets i + k + 1, at::cross_entropy); the training loss adds
// mtp_loss_weight / D x their sum; gradients reach every MTP parameter and the
// shared embedding and head.
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <torch/torch.h>

#include "moe/model.h"

namespace {

using namespace fmoe::moe;

ModelConfig mtp_config() {
  ModelConfig c = fmoe::testing::test_model({.vocab = 50, .hidden = 16, .layers = 2, .heads = 2, .kv_heads = 2, .head_dim = 8, .ffn = 32, .experts = 4, .top_k = 2, .moe_ffn = 8});
  c.num_groups = 1;
  c.mtp_depth = 2;
  c.mtp_loss_weight = 0.3;
  return c;
}

TEST(MTP, ParameterCountEqualsTheConfigArithmetic) {
  const ModelConfig c = mtp_config();
  MoEModel model(c);
  int64_t numel = 0;
  for (const auto& item : model.named_parameters()) {
    if (item.key().rfind("mtp.", 0) == 0) numel += item.value().numel();
  }
  EXPECT_EQ(numel, count_parameters(c).mtp);
}

TEST(MTP, DepthLossesEqualAByHandRecomputationAndAddToTheLoss) {
  torch::manual_seed(1);
  const ModelConfig c = mtp_config();
  MoEModel model(c);
  const int64_t b = 2, t = 9;
  const at::Tensor tokens = at::randint(0, c.vocab_size, {b, t + 1}, at::kLong);
  const ModelOutput out = model.forward(tokens, at::kFloat);
  ASSERT_EQ(out.mtp_losses.sizes(), (at::IntArrayRef{2}));

  // By hand: the main model's last hidden state, then each depth in turn.
  PipelineStage body = model.whole_model_stage();
  body.head = false;
  at::Tensor h = model.forward_stage(body, tokens, {}, at::kFloat).hidden.view({b, t, -1});
  double aux = 0;
  for (int64_t k = 1; k <= 2; ++k) {
    MTPModule& m = *model.mtp[static_cast<size_t>(k - 1)];
    const int64_t len = t - k;
    const at::Tensor emb = model.embedding->weight.index_select(0, tokens.narrow(1, k, len).reshape({-1}));
    const at::Tensor joined = at::cat({m.embed_norm->forward(emb, at::kFloat), m.hidden_norm->forward(h.narrow(1, 0, len).reshape({b * len, -1}), at::kFloat)}, -1);
    ForwardContext ctx;
    ctx.batch = b;
    ctx.seq_len = len;
    std::tie(ctx.rope_cos_TH, ctx.rope_sin_TH) = rope_tables(len, c.head_dim, c.rope_theta);
    ctx.aux_loss = at::zeros({});
    ctx.z_loss = at::zeros({});
    const at::Tensor y = m.block->forward(at::matmul(joined, m.proj.t()), ctx);
    const at::Tensor logits = at::matmul(m.norm->forward(y, at::kFloat), model.head->weight.t());
    const at::Tensor want = at::cross_entropy_loss(logits, tokens.narrow(1, k + 1, len).reshape({-1}));
    EXPECT_NEAR(out.mtp_losses[k - 1].item<double>(), want.item<double>(), 1e-5) << "depth " << k;
    aux += ctx.aux_loss.item<double>();
    h = y.view({b, len, -1});
  }
  const double expected = out.ce_loss.item<double>() + out.aux_loss.item<double>() + out.z_loss.item<double>() +
                          0.3 / 2 * out.mtp_losses.sum().item<double>();
  EXPECT_NEAR(out.loss.item<double>(), expected, 1e-5);
  EXPECT_GT(aux, 0);  // the MTP blocks' MoE balance terms are in the aux loss too

  out.loss.backward();
  for (const auto& item : model.named_parameters()) {
    if (item.key().rfind("mtp.", 0) != 0 && item.key() != "embedding.weight" && item.key() != "head.weight") continue;
    ASSERT_TRUE(item.value().grad().defined()) << item.key();
    EXPECT_GT(item.value().grad().abs().sum().item<double>(), 0) << item.key();
  }
}

TEST(MTP, RefusesSequencesNoLongerThanTheDepth) {
  MoEModel model(mtp_config());
  EXPECT_THROW(model.forward(at::zeros({1, 3}, at::kLong), at::kFloat), std::invalid_argument);
}

}  // namespace
