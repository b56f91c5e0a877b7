#include <gtest/gtest.h>

#include <torch/torch.h>

#include "trainer/optimizer.h"

namespace {

using namespace fmoe::trainer;
using namespace fmoe::config;
using namespace fmoe::checkpoint;

OptimizerConfig recipe(const std::string& main, const std::string& grad, const std::string& m, const std::string& v) {
  OptimizerConfig o;
  o.main_params_dtype = main;
  o.grad_dtype = grad;
  o.exp_avg_dtype = m;
  o.exp_avg_sq_dtype = v;
  o.weight_decay = 0.1;
  return o;
}

std::vector<NamedParameter> params(int64_t n) {
  torch::manual_seed(1);
  return {{"layers.0.moe.w13", (at::randn({n, 128}) * 0.02).requires_grad_()},
          {"layers.0.attention_norm.weight", at::ones({128}).requires_grad_()}};
}

TEST(Fp8Optimizer, BytesPerParameterOfTheRecipes) {
  const auto bytes = [](const OptimizerConfig& o) { return Optimizer(params(512), o).bytes_per_parameter(); };
  EXPECT_NEAR(bytes(recipe("fp32", "fp32", "fp32", "fp32")).training_state(), 16.0, 1e-9);
  EXPECT_NEAR(bytes(recipe("fp32", "fp32", "bf16", "bf16")).training_state(), 12.0, 1e-9);
  // MS-AMP O2: FP16 master, FP8 gradients, FP8 first moment, FP16 second moment; the
  // 1 x 128 FP8 tiles add 4 / 128 bytes of scale each.
  const StateBytes c = bytes(recipe("fp16", "fp8", "fp8", "fp16"));
  EXPECT_NEAR(c.master, 2.0, 0.01);
  EXPECT_NEAR(c.grads, 1.0 + 4.0 / 128, 1e-9);
  EXPECT_NEAR(c.exp_avg, 1.0 + 4.0 / 128, 0.01);
  EXPECT_NEAR(c.exp_avg_sq, 2.0, 0.01);
  EXPECT_NEAR(c.training_state(), 6.0625, 0.01);
  EXPECT_NEAR(bytes(recipe("fp16", "fp8", "fp8", "fp8")).training_state(), 5.09, 0.01);
  // FP4 gradients (Muon's matrices): two codes a byte plus a 4-byte scale per 128;
  // the AdamW parameters' (here the norm's 128) stay FP8.
  OptimizerConfig fp4 = recipe("bf16", "fp4", "fp8", "fp8");
  fp4.name = "muon";
  EXPECT_NEAR(bytes(fp4).grads, (512 * 128 * (0.5 + 4.0 / 128) + 128 * (1.0 + 4.0 / 128)) / (512 * 128 + 128), 1e-9);
  // NVFP4: a byte of E4M3 scale per 16 values and 4 bytes of tensor scale.
  fp4.grad_dtype = "nvfp4";
  EXPECT_NEAR(bytes(fp4).grads, (512 * 128 * (0.5 + 1.0 / 16) + 4 + 128 * (1.0 + 4.0 / 128)) / (512 * 128 + 128), 1e-9);
  // FP6: every parameter's gradient (the AdamW ones' too), 0.75 bytes and an E8M0 scale per 32.
  fp4.grad_dtype = "fp6";
  EXPECT_NEAR(bytes(fp4).grads, 0.75 + 1.0 / 32, 1e-9);
  EXPECT_NEAR(bytes(recipe("bf16", "fp6", "fp8", "fp8")).training_state(), 2.0 + 0.78125 + 2.0 * (1.0 + 4.0 / 128), 0.01);
  // FP6 first moments (Muon's momentum): stored packed, so measured from the stored bytes.
  OptimizerConfig fp6 = recipe("bf16", "fp6", "fp6", "fp8");
  fp6.name = "muon";
  const StateBytes b = bytes(fp6);
  EXPECT_NEAR(b.exp_avg, 0.75 + 1.0 / 32, 1e-9);
  EXPECT_NEAR(b.exp_avg_sq, 128 * (1.0 + 4.0 / 128) / (512 * 128 + 128), 1e-9);  // the norm's alone
  EXPECT_LT(b.training_state(), 3.6);
}

TEST(Fp8Optimizer, Fp6GradientsAreRoundedToNearestBeforeTheUpdate) {
  auto ps = params(64);
  ps[0].tensor.mutable_grad() = at::randn({64, 128}) * 1e-3;
  ps[1].tensor.mutable_grad() = at::randn({128});
  const at::Tensor before0 = ps[0].tensor.grad().clone(), before1 = ps[1].tensor.grad().clone();
  OptimizerConfig o = recipe("bf16", "fp6", "fp8", "fp8");
  o.name = "muon";
  Optimizer opt(ps, o);
  opt.quantize_gradients();
  // Both the Muon matrix and the AdamW norm weight: exactly what an FP6 store reads back, no seed involved.
  EXPECT_TRUE(at::equal(ps[0].tensor.grad(), fmoe::fp8::LowPrecisionTensor::round_trip(before0, fmoe::fp8::StorageDtype::kFp6)));
  EXPECT_TRUE(at::equal(ps[1].tensor.grad(), fmoe::fp8::LowPrecisionTensor::round_trip(before1, fmoe::fp8::StorageDtype::kFp6)));
  EXPECT_FALSE(at::equal(ps[0].tensor.grad(), before0));
  EXPECT_LE(((ps[0].tensor.grad() - before0).norm() / before0.norm()).item<double>(), 0.035);
}

TEST(Fp8Optimizer, FirstStepMatchesClosedFormUpToStorageRounding) {
  // After one step m_hat = g and v_hat = g^2: p -= lr * sign(g) + lr * wd * p.
  auto ps = params(256);
  Optimizer adam(ps, recipe("fp16", "fp32", "fp8", "fp16"));
  const at::Tensor p0 = ps[0].tensor.detach().clone();  // already rounded to the FP16 master
  ps[0].tensor.mutable_grad() = at::randn({256, 128});
  ps[1].tensor.mutable_grad() = at::randn({128});
  const at::Tensor g = ps[0].tensor.grad().clone();
  adam.step(1e-3);
  const at::Tensor expected = p0 * (1 - 1e-3 * 0.1) - 1e-3 * g.sign();
  // FP16 master: each weight rounded to 11 significant bits (relative 2^-11).
  const at::Tensor error = (ps[0].tensor.detach() - expected).abs();
  EXPECT_TRUE((error <= expected.abs() * std::ldexp(1.0, -11) + 1e-9).all().item<bool>()) << error.max();
  EXPECT_GT(error.max().item<double>(), 0.0) << "the master is rounded, not FP32";
}

TEST(Fp8Optimizer, Fp8GradientsAreRoundedBeforeTheUpdate) {
  auto ps = params(64);
  ps[0].tensor.mutable_grad() = at::randn({64, 128}) * 1e-3;
  ps[1].tensor.mutable_grad() = at::randn({128});
  const at::Tensor before = ps[0].tensor.grad().clone();
  Optimizer adam(ps, recipe("fp32", "fp8", "fp32", "fp32"));
  adam.quantize_gradients();
  const at::Tensor after = ps[0].tensor.grad();
  EXPECT_FALSE(at::equal(before, after));
  EXPECT_LE(((after - before).norm() / before.norm()).item<double>(), 0.05);
}

TEST(Fp8Optimizer, Fp4GradientsRoundStochasticallyAndReproducibly) {
  const auto rounded = [](int steps_before) {
    auto ps = params(64);
    OptimizerConfig o = recipe("fp32", "fp4", "fp32", "fp32");
    o.name = "muon";
    Optimizer adam(ps, o);
    for (int step = 0; step < steps_before; ++step) {
      ps[0].tensor.mutable_grad() = at::zeros({64, 128});
      ps[1].tensor.mutable_grad() = at::zeros({128});
      adam.step(0.0);
    }
    torch::manual_seed(5);
    ps[0].tensor.mutable_grad() = at::randn({64, 128}) * 1e-3;
    ps[1].tensor.mutable_grad() = at::randn({128});
    adam.quantize_gradients();
    return std::make_pair(ps[0].tensor.grad().clone(), ps[1].tensor.grad().clone());
  };
  torch::manual_seed(5);
  const at::Tensor before = at::randn({64, 128}) * 1e-3;
  const auto [once, norm_grad] = rounded(0);
  // On E2M1's grid of its tile's scale (max-abs / 6): |g| / scale in {0, 0.5, 1, 1.5, 2, 3, 4, 6}.
  const at::Tensor scale = before.view({-1, 128}).abs().amax(1, true) / 6.0;
  const at::Tensor units = (once.view({-1, 128}).abs() / scale);
  const at::Tensor grid = at::tensor({0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}, at::kFloat);
  EXPECT_LT((units.unsqueeze(-1) - grid).abs().amin(-1).max().item<double>(), 1e-5);
  // Within one step of the grid of the value, and unbiased: the rounding errors average out.
  EXPECT_LE(((once - before).abs() / scale.expand({-1, 128}).reshape({64, 128})).max().item<double>(), 2.0 + 1e-5);
  EXPECT_LT(std::abs((once - before).sum().item<double>()) / before.abs().sum().item<double>(), 0.02);
  // Seeded by name and step: the same step rounds to the same bits, the next one to others.
  EXPECT_TRUE(at::equal(rounded(0).first, once));
  EXPECT_FALSE(at::equal(rounded(1).first, once));
  // The norm's gradient (an AdamW parameter) is FP8's round to nearest, the same at every step.
  torch::manual_seed(5);
  at::randn({64, 128});
  const at::Tensor norm_before = at::randn({128});
  EXPECT_TRUE(at::equal(norm_grad, fmoe::fp8::LowPrecisionTensor::round_trip(norm_before, fmoe::fp8::StorageDtype::kFp8)));
  EXPECT_TRUE(at::equal(rounded(1).second, norm_grad));
}

TEST(Fp8Optimizer, Nvfp4GradientsRoundToNearestWhenAsked) {
  // grad_stochastic_rounding: false: NVFP4's round to nearest, the same bits at every step;
  // true (the default): stochastic, other bits at the next step.
  const auto rounded = [](bool stochastic, int steps_before, bool hadamard = false) {
    auto ps = params(64);
    OptimizerConfig o = recipe("fp32", "nvfp4", "fp32", "fp32");
    o.name = "muon";
    o.grad_stochastic_rounding = stochastic;
    o.grad_hadamard = hadamard;
    Optimizer muon(ps, o);
    for (int step = 0; step < steps_before; ++step) {
      ps[0].tensor.mutable_grad() = at::zeros({64, 128});
      ps[1].tensor.mutable_grad() = at::zeros({128});
      muon.step(0.0);
    }
    torch::manual_seed(5);
    ps[0].tensor.mutable_grad() = at::randn({64, 128}) * 1e-3;
    ps[1].tensor.mutable_grad() = at::randn({128});
    muon.quantize_gradients();
    return ps[0].tensor.grad().clone();
  };
  torch::manual_seed(5);
  const at::Tensor before = at::randn({64, 128}) * 1e-3;
  const at::Tensor nearest = fmoe::fp8::LowPrecisionTensor::round_trip(before, fmoe::fp8::StorageDtype::kNvfp4);
  EXPECT_TRUE(at::equal(rounded(false, 0), nearest));
  EXPECT_TRUE(at::equal(rounded(false, 1), nearest));
  EXPECT_FALSE(at::equal(rounded(true, 0), nearest));
  EXPECT_FALSE(at::equal(rounded(true, 1), rounded(true, 0)));
  // grad_hadamard: rotated by a seed of the step and the name: other bits than plain rounding
  // and at the next step, the same bits when the step is replayed, within FP4's error.
  const at::Tensor rotated = rounded(false, 0, true);
  EXPECT_FALSE(at::equal(rotated, nearest));
  EXPECT_TRUE(at::equal(rounded(false, 0, true), rotated));
  EXPECT_FALSE(at::equal(rounded(false, 1, true), rotated));
  EXPECT_LT((rotated - before).norm().item<double>(), 0.2 * before.norm().item<double>());
}

TEST(Fp8Optimizer, StateRestoresExactly) {
  const OptimizerConfig o = recipe("fp16", "fp8", "fp8", "fp8");
  auto ps = params(128);
  Optimizer a(ps, o);
  for (int step = 0; step < 3; ++step) {
    ps[0].tensor.mutable_grad() = at::randn({128, 128});
    ps[1].tensor.mutable_grad() = at::randn({128});
    a.step(1e-3);
  }
  auto qs = params(128);
  Optimizer b(qs, o);
  b.load_state(a.state(), "ckpt");
  EXPECT_EQ(b.steps_taken(), 3);
  const TensorMap sa = a.state(), sb = b.state();
  ASSERT_EQ(sa.size(), sb.size());
  for (const auto& [name, tensor] : sa) EXPECT_TRUE(at::equal(tensor, sb.at(name))) << name;
  TensorMap broken = sa;
  broken.erase("exp_avg.layers.0.moe.w13.scales");
  Optimizer c(params(128), o);
  EXPECT_THROW(c.load_state(broken, "ckpt"), std::runtime_error);
}

TEST(Fp8Optimizer, StochasticSecondMomentsReplayAndResumeBitExactly) {
  // exp_avg_sq_stochastic_rounding: the noise is a hash of the step and the name, so four steps
  // in one run, in a second run, and as two steps + a restore + two steps store the same bits;
  // rounding to nearest stores other ones.
  OptimizerConfig o = recipe("bf16", "fp32", "fp8", "fp8");
  o.stochastic_rounding = true;
  o.exp_avg_sq_stochastic_rounding = true;
  const auto grads = [](int step, std::vector<NamedParameter>& ps) {
    torch::manual_seed(100 + step);
    ps[0].tensor.mutable_grad() = at::randn({128, 128}) * (1.0 - 0.2 * step);
    ps[1].tensor.mutable_grad() = at::randn({128});
  };
  const auto run = [&](const OptimizerConfig& config, int steps, std::vector<NamedParameter>& ps) {
    auto opt = std::make_unique<Optimizer>(ps, config);
    for (int step = 0; step < steps; ++step) {
      grads(step, ps);
      opt->step(1e-3);
    }
    return opt;
  };
  auto pa = params(128), pb = params(128), pn = params(128);
  const TensorMap a = run(o, 4, pa)->state(), b = run(o, 4, pb)->state();
  OptimizerConfig nearest_config = o;
  nearest_config.exp_avg_sq_stochastic_rounding = false;
  const TensorMap nearest = run(nearest_config, 4, pn)->state();
  auto pc = params(128);
  const TensorMap half = run(o, 2, pc)->state();
  auto pd = params(128);
  for (size_t i = 0; i < pd.size(); ++i) pd[i].tensor.detach().copy_(pc[i].tensor.detach());
  Optimizer resumed(pd, o);
  resumed.load_state(half, "ckpt");
  for (int step = 2; step < 4; ++step) {
    grads(step, pd);
    resumed.step(1e-3);
  }
  const TensorMap c = resumed.state();
  ASSERT_EQ(a.size(), c.size());
  for (const auto& [name, tensor] : a) {
    EXPECT_TRUE(at::equal(tensor, b.at(name))) << name;
    EXPECT_TRUE(at::equal(tensor, c.at(name))) << name;
  }
  EXPECT_TRUE(at::equal(pa[0].tensor, pd[0].tensor));
  EXPECT_FALSE(at::equal(a.at("exp_avg_sq.layers.0.moe.w13.data"), nearest.at("exp_avg_sq.layers.0.moe.w13.data")));
}

}  // namespace
