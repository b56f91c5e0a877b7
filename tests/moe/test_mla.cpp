// Multi-head latent attention and YaRN: the module's parameter count equals the
// config arithmetic the planner uses; its output and every gradient equal a
// naive per-head implementation written from DeepSeek-V3's equations; YaRN's
// tables keep the fast pairs, interpolate the slow ones by the factor and scale
// cos/sin by the attention factor.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cmath>

#include "moe/layers.h"
#include "moe/model.h"

namespace {

using namespace fmoe::moe;

ModelConfig mla_config(int64_t q_lora_rank) {
  ModelConfig c;
  c.attention = "mla";
  c.hidden_size = 24;
  c.num_heads = 3;
  c.num_kv_heads = 3;
  c.q_lora_rank = q_lora_rank;
  c.kv_lora_rank = 10;
  c.qk_nope_head_dim = 6;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 5;
  c.max_seq_len = 8;
  c.rope_scaling.type = "yarn";
  c.rope_scaling.factor = 4;
  c.rope_scaling.original_max_position_embeddings = 4;
  c.rope_scaling.mscale = 1;
  c.rope_scaling.mscale_all_dim = 0.7;
  return c;
}

at::Tensor rms(const at::Tensor& x, const at::Tensor& g, double eps) { return x * (x.square().mean(-1, true) + eps).rsqrt() * g; }

// Half-split rotation of the last dim by position.
at::Tensor rotate(const at::Tensor& x_BTHr, const at::Tensor& cos_TH, const at::Tensor& sin_TH) {
  const int64_t half = x_BTHr.size(-1) / 2;
  const at::Tensor c = cos_TH.unsqueeze(1).to(x_BTHr.scalar_type()), s = sin_TH.unsqueeze(1).to(x_BTHr.scalar_type());
  const at::Tensor a = x_BTHr.narrow(-1, 0, half), b = x_BTHr.narrow(-1, half, half);
  return at::cat({a * c - b * s, b * c + a * s}, -1);
}

// DeepSeek-V3's MLA, head by head, in FP64.
at::Tensor naive_mla(const MLAttention& m, const ModelConfig& c, const at::Tensor& h_BTD) {
  const int64_t b = h_BTD.size(0), t = h_BTD.size(1), H = c.num_heads, nope = c.qk_nope_head_dim, r = c.qk_rope_head_dim,
                v = c.v_head_dim, rank = c.kv_lora_rank;
  const auto d = [](const at::Tensor& w) { return w.to(at::kDouble); };
  const at::Tensor h = h_BTD.to(at::kDouble);
  const at::Tensor q = (c.q_lora_rank > 0 ? at::matmul(rms(at::matmul(h, d(m.wq_a).t()), d(m.q_a_norm->weight), c.norm_eps), d(m.wq_b).t())
                                          : at::matmul(h, d(m.wq).t()))
                           .view({b, t, H, nope + r});
  const at::Tensor kv_a = at::matmul(h, d(m.wkv_a).t());
  const at::Tensor latent = rms(kv_a.narrow(-1, 0, rank), d(m.kv_a_norm->weight), c.norm_eps);
  const auto [cos, sin] = rope_tables(t, r, c.rope_theta, c.rope_scaling);
  const at::Tensor k_rope = rotate(kv_a.narrow(-1, rank, r).unsqueeze(2), cos, sin);  // [B, T, 1, r]
  const at::Tensor kv = at::matmul(latent, d(m.wkv_b).t()).view({b, t, H, nope + v});
  const at::Tensor q_rope = rotate(q.narrow(-1, nope, r), cos, sin);
  std::vector<at::Tensor> heads;
  for (int64_t i = 0; i < H; ++i) {
    const at::Tensor qi = at::cat({q.select(2, i).narrow(-1, 0, nope), q_rope.select(2, i)}, -1);            // [B, T, qk]
    const at::Tensor ki = at::cat({kv.select(2, i).narrow(-1, 0, nope), k_rope.select(2, 0)}, -1);           // [B, T, qk]
    at::Tensor scores = at::matmul(qi, ki.transpose(1, 2)) * c.softmax_scale();
    scores = scores.masked_fill(at::ones({t, t}, at::kBool).triu(1), -INFINITY);
    heads.push_back(at::matmul(scores.softmax(-1), kv.select(2, i).narrow(-1, nope, v)));  // [B, T, v]
  }
  return at::matmul(at::cat(heads, -1), d(m.wo).t());
}

TEST(MLA, ParameterCountsEqualTheConfigArithmetic) {
  for (int64_t q_lora : {0, 16}) {
    const ModelConfig c = mla_config(q_lora);
    MLAttention m(c);
    int64_t numel = 0;
    for (const auto& p : m.parameters()) numel += p.numel();
    EXPECT_EQ(numel, attention_parameters(c)) << "q_lora_rank " << q_lora;
  }
}

TEST(MLA, OutputAndGradientsEqualANaiveImplementation) {
  for (int64_t q_lora : {0, 16}) {
    SCOPED_TRACE("q_lora_rank " + std::to_string(q_lora));
    torch::manual_seed(5);
    const ModelConfig c = mla_config(q_lora);
    MLAttention m(c);
    {
      torch::NoGradGuard no_grad;
      for (auto& p : m.parameters()) p.uniform_(-0.3, 0.3);  // norms off 1 too
    }
    const int64_t b = 2, t = 7;
    const at::Tensor h = at::randn({b, t, c.hidden_size}).requires_grad_();
    ForwardContext ctx;
    ctx.batch = b;
    ctx.seq_len = t;
    std::tie(ctx.rope_cos_TH, ctx.rope_sin_TH) = rope_tables(t, c.qk_rope_head_dim, c.rope_theta, c.rope_scaling);
    const at::Tensor y = m.forward(h.view({b * t, -1}), ctx).view({b, t, -1});
    const at::Tensor ref = naive_mla(m, c, h);
    EXPECT_LT((y.to(at::kDouble) - ref).abs().max().item<double>(), 1e-5);
    const at::Tensor dy = at::randn(y.sizes());
    std::vector<at::Tensor> inputs{h};
    for (const auto& p : m.parameters()) inputs.push_back(p);
    const auto got = torch::autograd::grad({y}, inputs, {dy});
    const auto want = torch::autograd::grad({ref}, inputs, {dy.to(at::kDouble)});
    for (size_t i = 0; i < got.size(); ++i) {
      const double scale = want[i].abs().max().item<double>();
      EXPECT_GT(scale, 0) << "input " << i;
      EXPECT_LT((got[i].to(at::kDouble) - want[i]).abs().max().item<double>(), 1e-5 * std::max(1.0, scale)) << "input " << i;
    }
  }
}

TEST(Yarn, FastPairsKeptSlowPairsInterpolatedAndCosSinScaled) {
  RopeScaling y;
  y.type = "yarn";
  y.factor = 40;
  y.original_max_position_embeddings = 4096;
  y.mscale = 1.0;
  y.mscale_all_dim = 0.0;  // the attention factor from the factor alone: 0.1 ln 40 + 1
  const int64_t dim = 64, half = 32;
  const auto [cos, sin] = rope_tables(16, dim, 10000.0, y);
  const auto [plain_cos, plain_sin] = rope_tables(16, dim, 10000.0);
  const double attention = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(cos[0][0].item<double>(), attention, 1e-6);  // position 0: cos 1 times the factor
  // Pair i rotates theta^(-2i/64) per position; over 4096 positions, 32 rotations at
  // pair ~10.3 (floor 10) and one at ~22.8 (ceil 23): below 10 kept, above 23 divided by 40.
  const at::Tensor angle = at::atan2(sin[1], cos[1]).to(at::kDouble), plain = at::atan2(plain_sin[1], plain_cos[1]).to(at::kDouble);
  for (int64_t i : {int64_t{0}, int64_t{5}, int64_t{10}}) EXPECT_NEAR(angle[i].item<double>(), plain[i].item<double>(), 1e-6) << "pair " << i;
  for (int64_t i : {int64_t{23}, int64_t{28}, half - 1}) EXPECT_NEAR(angle[i].item<double>(), plain[i].item<double>() / 40, 1e-8) << "pair " << i;
  // Between, a linear ramp: pair 16 is (16 - 10) / 13 of the way to interpolation.
  const double share = 6.0 / 13.0;
  EXPECT_NEAR(angle[16].item<double>(), plain[16].item<double>() * (share / 40 + 1 - share), 1e-7);
  // mscale / mscale_all_dim as DeepSeek-V3 sets them (1, 1): cos/sin unscaled, softmax scaled by mscale^2.
  y.mscale_all_dim = 1.0;
  EXPECT_NEAR(rope_tables(4, dim, 10000.0, y).first[0][0].item<double>(), 1.0, 1e-7);
  ModelConfig c = mla_config(0);
  c.rope_scaling = y;
  EXPECT_NEAR(c.softmax_scale(), std::pow(attention, 2) / std::sqrt(10.0), 1e-12);
}

}  // namespace
