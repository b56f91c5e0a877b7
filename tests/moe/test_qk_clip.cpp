// QK-clip (MuonClip): an attention records each head's largest causal logit of
// a training forward (not under no_grad), and clip_heads(gamma) multiplies head
// h's logits by exactly gamma[h] — for GQA (a key head shared by two query
// heads clipped differently), MHA with biases, and MLA (the shared rotary key
// untouched) — checked by recording again after the clip.
#include <gtest/gtest.h>
#include "tests/test_util.h"

#include <torch/torch.h>

#include "moe/layers.h"
#include "moe/model.h"

namespace {

using namespace fmoe::moe;

ModelConfig small(const std::string& attention, int64_t kv_heads, bool bias) {
  ModelConfig c = fmoe::testing::test_model({.vocab = 50, .hidden = 16, .layers = 2, .heads = 4, .kv_heads = kv_heads, .head_dim = 8, .ffn = 32,
                                             .experts = 4, .top_k = 2, .moe_ffn = 8});
  c.num_groups = 1;
  c.attention_bias = bias;
  if (attention == "mla") fmoe::testing::use_mla(c, {.q_lora_rank = 6, .kv_lora_rank = 10, .nope = 6, .rope = 4, .v = 5});
  return c;
}

at::Tensor record(MoEModel& model, const at::Tensor& tokens) {
  QkClipState& s = model.layers[0]->qk_clip();
  s.max_logit = at::Tensor();
  s.record = true;
  model.forward(tokens, at::kFloat);
  return s.max_logit.clone();
}

TEST(QkClip, ClippedHeadsLogitsShrinkByExactlyGamma) {
  for (const auto& [attention, kv_heads, bias] : {std::tuple{std::string("gqa"), int64_t{2}, false}, std::tuple{std::string("mha"), int64_t{4}, true},
                                                  std::tuple{std::string("mla"), int64_t{4}, false}}) {
    torch::manual_seed(3);
    MoEModel model(small(attention, kv_heads, bias));
    if (bias) {
      at::NoGradGuard no_grad;
      model.layers[0]->attention->bqkv.normal_(0, 0.5);
    }
    const at::Tensor tokens = at::randint(0, 50, {2, 9}, at::kLong);
    const at::Tensor before = record(model, tokens);
    ASSERT_EQ(before.sizes(), (at::IntArrayRef{4})) << attention;
    // Validation (no autograd) records nothing.
    {
      at::NoGradGuard no_grad;
      QkClipState& s = model.layers[0]->qk_clip();
      s.max_logit = at::Tensor();
      model.forward(tokens, at::kFloat);
      EXPECT_FALSE(s.max_logit.defined()) << attention;
    }
    // Heads 0 and 3 clipped to a threshold below their logit; 1 and 2 kept.
    // Under GQA head 0 shares its key head with head 1, which is not clipped.
    const at::Tensor gamma = at::tensor({0.5f, 1.0f, 1.0f, 0.25f});
    TransformerLayer& layer = *model.layers[0];
    layer.attention ? layer.attention->clip_heads(gamma) : layer.mla->clip_heads(gamma);
    const at::Tensor after = record(model, tokens);
    EXPECT_TRUE(at::allclose(after, before * gamma, 1e-5, 1e-6)) << attention << "\n" << before << "\n" << after;
  }
}

}  // namespace
