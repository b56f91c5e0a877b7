// The published presets: parameter counts from the config alone against the
// publishers' figures, and DeepSeek-V3's training FLOPs against Megatron-LM's
// formula written out here independently; every preset the trainer implements
// built at reduced width, its modules' sizes against the counts. Runs with the
// source tree as cwd.
#include <gtest/gtest.h>

#include "moe/model.h"
#include "moe/model_config.h"
#include "config/config.h"

namespace {

using fmoe::moe::ModelConfig;

ModelConfig preset(const std::string& name) {
  return fmoe::config::load_config("configs/presets/" + name + ".yaml").model;
}

void expect_within(double value, double published, double tolerance, const std::string& what) {
  EXPECT_LE(std::abs(value - published) / published, tolerance) << what << ": " << value / 1e9 << "B vs " << published / 1e9 << "B";
}

TEST(Presets, TotalParametersWithinOnePercentOfPublished) {
  expect_within(fmoe::moe::count_parameters(preset("deepseek-v3")).total, 671e9, 0.01, "DeepSeek-V3");
  expect_within(fmoe::moe::count_parameters(preset("deepseek-v2")).total, 236e9, 0.01, "DeepSeek-V2");
  expect_within(fmoe::moe::count_parameters(preset("deepseek-v2-lite")).total, 15.7e9, 0.01, "DeepSeek-V2-Lite");
  expect_within(fmoe::moe::count_parameters(preset("mixtral-8x7b")).total, 46.7e9, 0.01, "Mixtral-8x7B");
  expect_within(fmoe::moe::count_parameters(preset("qwen2-57b-a14b")).total, 57e9, 0.01, "Qwen2-57B-A14B");
}

TEST(Presets, ActivatedParametersWithinTwoPercentWherePublishersCountEmbeddings) {
  expect_within(fmoe::moe::count_parameters(preset("deepseek-v3")).activated, 37e9, 0.02, "DeepSeek-V3");
  expect_within(fmoe::moe::count_parameters(preset("mixtral-8x7b")).activated, 12.9e9, 0.02, "Mixtral-8x7B");
  expect_within(fmoe::moe::count_parameters(preset("qwen2-57b-a14b")).activated, 14e9, 0.02, "Qwen2-57B-A14B");
  // DeepSeek-V3's MTP module: the 14B that make the released checkpoint 685B.
  const auto v3 = fmoe::moe::count_parameters(preset("deepseek-v3"));
  expect_within(v3.total + v3.mtp, 685e9, 0.01, "DeepSeek-V3 with MTP");
}

// Megatron-LM's accounting of training FLOPs per token for an MLA + MoE model:
// 3 passes x 2 FLOPs per multiply-add over every activated GEMM, plus the
// causal attention core, plus the logits (once per MTP depth more).
double megatron_flops_per_token(const ModelConfig& m, int64_t seq, bool with_mtp) {
  const double d = m.hidden_size, h = m.num_heads, s = static_cast<double>(seq);
  const double qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
  const double q_proj = d * m.q_lora_rank + m.q_lora_rank * h * qk;
  const double kv_proj = d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim);
  const double out_proj = h * m.v_head_dim * d;
  const double core = s * h * (qk + m.v_head_dim) / 2;  // QK^T and AV, causal half
  const double attention = q_proj + kv_proj + out_proj + core;
  const double dense_mlp = 3 * d * m.ffn_hidden_size;
  const double moe_mlp = 3 * d * m.moe_ffn_hidden_size * (m.top_k + m.num_shared_experts) + d * m.num_experts;
  const double layers = m.num_layers * attention + m.first_k_dense * dense_mlp + (m.num_layers - m.first_k_dense) * moe_mlp;
  const double logits = d * m.vocab_size;
  double per_token = layers + logits;
  if (with_mtp) per_token += m.mtp_depth * (2 * d * d + attention + moe_mlp + logits);
  return 3 * 2 * per_token;
}

TEST(Presets, DeepSeekV3FlopsPerTokenMatchMegatronAccounting) {
  ModelConfig v3 = preset("deepseek-v3");
  const double with_mtp = fmoe::moe::training_flops_per_token(v3, 4096);
  EXPECT_LE(std::abs(with_mtp - megatron_flops_per_token(v3, 4096, true)) / with_mtp, 0.02);
  EXPECT_NEAR(with_mtp / 1e9, 260, 260 * 0.03);
  v3.mtp_depth = 0;
  const double without = fmoe::moe::training_flops_per_token(v3, 4096);
  EXPECT_LE(std::abs(without - megatron_flops_per_token(v3, 4096, false)) / without, 0.02);
  EXPECT_NEAR(without / 1e9, 250, 250 * 0.03);
}

TEST(Presets, TrainerImplementsEveryPreset) {
  for (const char* name : {"deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "mixtral-8x7b", "qwen2-57b-a14b"}) {
    EXPECT_EQ(preset(name).trainer_support(), "") << name;
  }
}

// A preset at reduced width and depth (every dimension divided, the structure
// kept: MLA ranks, experts, groups, MTP): small enough to build.
ModelConfig reduced(ModelConfig c) {
  c.hidden_size /= 32;
  c.ffn_hidden_size /= 32;
  c.moe_ffn_hidden_size /= 32;
  c.q_lora_rank /= 32;
  c.kv_lora_rank /= 32;
  c.num_heads = std::max<int64_t>(1, c.num_heads / 8);
  c.num_kv_heads = std::max<int64_t>(1, c.num_kv_heads / 8);
  c.head_dim /= 8;
  c.qk_nope_head_dim /= 8;
  c.qk_rope_head_dim /= 8;
  c.v_head_dim /= 8;
  c.vocab_size /= 64;
  c.first_k_dense = std::min<int64_t>(c.first_k_dense, 1);
  c.num_layers = c.first_k_dense + 1;
  c.max_seq_len = 64;
  return c;
}

TEST(Presets, ModulesBuiltFromEachPresetHoldWhatTheCountsSay) {
  for (const char* name : {"deepseek-v3", "deepseek-v2", "deepseek-v2-lite", "mixtral-8x7b", "qwen2-57b-a14b"}) {
    SCOPED_TRACE(name);
    const ModelConfig c = reduced(preset(name));
    ASSERT_EQ(c.validate(), "");
    const fmoe::moe::MoEModel model(c);
    int64_t main = 0, mtp = 0, attention = 0;
    for (const auto& item : model.named_parameters()) {
      (item.key().rfind("mtp.", 0) == 0 ? mtp : main) += item.value().numel();
      if (item.key().rfind("layers.", 0) == 0 && item.key().find(".attention.") != std::string::npos) attention += item.value().numel();
    }
    const auto counts = fmoe::moe::count_parameters(c);
    EXPECT_EQ(main, counts.total);
    EXPECT_EQ(mtp, counts.mtp);
    EXPECT_EQ(attention, c.num_layers * fmoe::moe::attention_parameters(c));
    EXPECT_EQ(c.is_mla(), std::string(name).rfind("deepseek", 0) == 0);
  }
}

}  // namespace
