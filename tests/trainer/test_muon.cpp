// Muon (optimizer.name: muon): which parameters it takes, the Newton-Schulz
// iteration's singular values, one step against the formula written out, the
// update's RMS under the rms rule, and its state through a checkpoint map.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <stdexcept>
#include <string>

#include "trainer/optimizer.h"

namespace {

using namespace fmoe::trainer;
using fmoe::config::OptimizerConfig;

OptimizerConfig muon_config() {
  OptimizerConfig o;
  o.name = "muon";
  o.weight_decay = 0.1;
  return o;
}

TEST(Muon, TakesTheHiddenMatricesAndSplitsFusedOnes) {
  const OptimizerConfig o = muon_config();
  fmoe::moe::ModelConfig m;
  m.num_heads = 4, m.num_kv_heads = 2, m.head_dim = 8;
  const auto take = [&](const std::string& name, std::vector<int64_t> shape) { return muon_matrices(name, shape, o, &m); };
  EXPECT_TRUE(take("layers.0.attention.wo", {32, 32}).matrix);
  EXPECT_TRUE(take("layers.0.attention.wkv_b", {64, 16}).matrix);
  EXPECT_TRUE(take("layers.1.moe.w2", {4, 16, 32}).matrix);
  EXPECT_TRUE(take("mtp.0.proj", {32, 64}).matrix);
  for (const auto& [adamw, shape] : std::vector<std::pair<std::string, std::vector<int64_t>>>{
           {"embedding.weight", {100, 32}}, {"head.weight", {100, 32}}, {"layers.0.attention_norm.weight", {32}},
           {"layers.1.moe.router_weight", {8, 32}}, {"layers.1.moe.shared_gate", {1, 32}}, {"layers.0.attention.bqkv", {64}}}) {
    EXPECT_FALSE(take(adamw, shape).matrix) << adamw;
  }
  const fmoe::moe::WeightMatrices qkv = take("layers.0.attention.wqkv", {64, 32});
  EXPECT_EQ(qkv.split_dim, 0);
  EXPECT_EQ(qkv.blocks, (std::vector<int64_t>{32, 16, 16}));
  const fmoe::moe::WeightMatrices w13 = take("layers.1.moe.w13", {4, 32, 48});
  EXPECT_EQ(w13.split_dim, 2);
  EXPECT_EQ(w13.blocks, (std::vector<int64_t>{24, 24}));
  EXPECT_TRUE(muon_matrices("layers.0.attention.wqkv", std::vector<int64_t>{64, 32}, o).blocks.empty());  // no model: whole
  OptimizerConfig adamw = o;
  adamw.name = "adamw";
  EXPECT_FALSE(muon_matrices("layers.0.attention.wo", std::vector<int64_t>{32, 32}, adamw).matrix);
}

TEST(Muon, NewtonSchulzKeepsTheDirectionsAndFlattensTheSpectrum) {
  torch::manual_seed(3);
  for (const auto& shape : {std::vector<int64_t>{3, 16, 48}, std::vector<int64_t>{2, 40, 8}}) {
    // Well conditioned (a Gaussian matrix), then badly: columns scaled over three decades.
    for (const bool spread : {false, true}) {
      const at::Tensor G = spread ? at::randn(shape) * at::logspace(0, -3, shape[2]).view({1, 1, -1}) : at::randn(shape);
      const at::Tensor O = newton_schulz(G, 5);
      ASSERT_EQ(O.sizes(), G.sizes());
      const auto [U, S, Vh] = at::linalg_svd(G, /*full_matrices=*/false);
      const at::Tensor polar = at::bmm(U, Vh);  // the exact orthogonalization U V^T
      const at::Tensor s = at::linalg_svdvals(O);
      // The quintic's coefficients leave singular values near, not at, 1; five
      // steps lift a direction by at most 3.4445^5 (about 480), so the smallest
      // of a spread spectrum stay below.
      if (!spread) {
        EXPECT_GE(s.min().item<double>(), 0.6);
      }
      EXPECT_LE(s.max().item<double>(), 1.25);
      // Along each direction of G, O's gain is its singular value's: O's component
      // U^T O V is close to diagonal.
      const at::Tensor in_basis = at::bmm(at::bmm(U.transpose(1, 2), O), Vh.transpose(1, 2));
      const at::Tensor off = in_basis - at::diag_embed(at::diagonal(in_basis, 0, 1, 2));
      EXPECT_LE(off.abs().max().item<double>(), 1e-3);
      if (!spread) {
        EXPECT_LE((O - polar).norm().item<double>() / polar.norm().item<double>(), 0.35);
      }
      // In BF16, as the run's GEMMs may be: the same result to BF16's precision.
      const at::Tensor O16 = newton_schulz(G, 5, at::kBFloat16);
      EXPECT_EQ(O16.scalar_type(), at::kFloat);
      EXPECT_FALSE(at::equal(O16, O));  // the GEMMs did run in BF16
      EXPECT_LE((O16 - O).norm().item<double>() / O.norm().item<double>(), 0.03);
    }
  }
}

TEST(Muon, OneStepIsTheFormula) {
  torch::manual_seed(5);
  fmoe::moe::ModelConfig m;
  OptimizerConfig o = muon_config();
  o.lr = 0.02;
  o.adamw_lr = 0.01;
  const at::Tensor wo0 = at::randn({8, 12}) * 0.1, w13_0 = at::randn({2, 6, 10}) * 0.1, norm0 = at::ones({6});
  std::vector<NamedParameter> ps = {{"layers.0.attention.wo", wo0.clone().requires_grad_()},
                                    {"layers.0.moe.w13", w13_0.clone().requires_grad_()},
                                    {"layers.0.attention_norm.weight", norm0.clone().requires_grad_()}};
  Optimizer opt(ps, o, &m);
  std::vector<at::Tensor> grads = {at::randn({8, 12}), at::randn({2, 6, 10}), at::randn({6})};
  for (size_t i = 0; i < ps.size(); ++i) ps[i].tensor.mutable_grad() = grads[i].clone();
  opt.step(o.lr * 0.5);  // the schedule at half its peak
  const double lr = o.lr * 0.5, mu = o.muon_momentum;
  // Momentum from zero: M = (1 - mu) G; Nesterov: U = G + mu (M - G).
  const auto nesterov = [&](const at::Tensor& g) { return g + mu * ((1 - mu) * g - g); };
  // wo [out 8, in 12]: one matrix, scale 0.2 sqrt(12).
  const at::Tensor wo_update = newton_schulz(nesterov(grads[0]).unsqueeze(0), 5).squeeze(0) * (0.2 * std::sqrt(12.0));
  EXPECT_TRUE(at::allclose(ps[0].tensor, wo0 * (1 - lr * 0.1) - lr * wo_update, 0, 1e-6));
  // w13 [2 experts, in 6, gate 5 | up 5]: four matrices 6 x 5, scale 0.2 sqrt(6).
  const at::Tensor u = nesterov(grads[1]);
  const at::Tensor w13_update = at::cat({newton_schulz(u.narrow(2, 0, 5), 5), newton_schulz(u.narrow(2, 5, 5), 5)}, 2) * (0.2 * std::sqrt(6.0));
  EXPECT_TRUE(at::allclose(ps[1].tensor, w13_0 * (1 - lr * 0.1) - lr * w13_update, 0, 1e-6));
  // The norm: AdamW at adamw_lr on the same schedule (half), no decay; its first step moves every entry by lr.
  const double adamw_lr = o.adamw_lr * 0.5;
  EXPECT_TRUE(at::allclose(ps[2].tensor, norm0 - adamw_lr * grads[2].sign(), 0, 1e-6));
  // Muon keeps one moment: no exp_avg_sq for its matrices.
  const auto state = opt.state();
  EXPECT_TRUE(state.count("exp_avg.layers.0.attention.wo.data"));
  EXPECT_FALSE(state.count("exp_avg_sq.layers.0.attention.wo.data"));
  EXPECT_TRUE(state.count("exp_avg_sq.layers.0.attention_norm.weight.data"));
  const StateBytes bytes = opt.bytes_per_parameter();
  EXPECT_DOUBLE_EQ(bytes.exp_avg_sq, 4.0 * 6 / (96 + 120 + 6));
}

TEST(Muon, TheRmsRuleMatchesAdamWsUpdateSize) {
  torch::manual_seed(7);
  OptimizerConfig o = muon_config();
  o.weight_decay = 0;
  o.lr = 1.0;
  for (const auto& shape : {std::vector<int64_t>{64, 256}, std::vector<int64_t>{256, 64}, std::vector<int64_t>{4, 128, 96}}) {
    const at::Tensor w0 = at::zeros(shape);
    std::vector<NamedParameter> ps = {{shape.size() == 3 ? "layers.0.moe.w2" : "layers.0.attention.wo", w0.clone().requires_grad_()}};
    Optimizer opt(ps, o);
    ps[0].tensor.mutable_grad() = at::randn(shape);
    opt.step(1.0);
    const double rms = ps[0].tensor.square().mean().sqrt().item<double>();
    EXPECT_GT(rms, 0.15) << shape;  // 0.2 x the mean singular value of the iteration, about 0.8-1
    EXPECT_LT(rms, 0.23) << shape;
  }
}

TEST(Muon, StateRoundTripsAndRefusesTheOtherOptimizers) {
  torch::manual_seed(9);
  OptimizerConfig o = muon_config();
  o.exp_avg_dtype = "bf16";
  const auto make = [] {
    return std::vector<NamedParameter>{{"layers.0.attention.wo", (at::randn({16, 16}) * 0.1).requires_grad_()},
                                       {"head.weight", (at::randn({8, 16}) * 0.1).requires_grad_()}};
  };
  torch::manual_seed(11);
  std::vector<NamedParameter> a = make();
  Optimizer first(a, o);
  const std::vector<at::Tensor> g1 = {at::randn({16, 16}), at::randn({8, 16})}, g2 = {at::randn({16, 16}), at::randn({8, 16})};
  for (size_t i = 0; i < a.size(); ++i) a[i].tensor.mutable_grad() = g1[i].clone();
  first.step(0.01);
  // A second optimizer over copies of the weights, from the first's state.
  std::vector<NamedParameter> b = make();
  for (size_t i = 0; i < b.size(); ++i) b[i].tensor.detach().copy_(a[i].tensor.detach());
  Optimizer second(b, o);
  second.load_state(first.state(), "state");
  EXPECT_EQ(second.steps_taken(), 1);
  for (size_t i = 0; i < a.size(); ++i) a[i].tensor.mutable_grad() = g2[i].clone(), b[i].tensor.mutable_grad() = g2[i].clone();
  first.step(0.01);
  second.step(0.01);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(at::equal(a[i].tensor, b[i].tensor)) << a[i].name;
  // AdamW's state into Muon, and Muon's into AdamW: one line naming the parameter.
  OptimizerConfig adamw = o;
  adamw.name = "adamw";
  std::vector<NamedParameter> c = make();
  Optimizer plain(c, adamw);
  try {
    second.load_state(plain.state(), "ckpt/optimizer.safetensors");
    FAIL() << "AdamW state taken by Muon";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("'layers.0.attention.wo' was written by AdamW"), std::string::npos) << e.what();
  }
  try {
    plain.load_state(first.state(), "ckpt/optimizer.safetensors");
    FAIL() << "Muon state taken by AdamW";
  } catch (const std::runtime_error& e) {
    EXPECT_NE(std::string(e.what()).find("written by Muon"), std::string::npos) << e.what();
  }
}

}  // namespace
