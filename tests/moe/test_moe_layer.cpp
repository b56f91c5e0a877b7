#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <torch/torch.h>

#include "fp8/fp8_gemm.h"
#include "moe/grouped_swiglu.h"
#include "moe/model.h"
#include "moe/layers.h"
#include "moe/rms_norm.h"
#include "moe/rope.h"

namespace {

using namespace fmoe::moe;

double relative_error(const at::Tensor& a, const at::Tensor& b) {
  return ((a - b).norm() / (b.norm() + 1e-30)).item<double>();
}

ModelConfig small_config() {
  ModelConfig c = fmoe::testing::test_model({.vocab = 97, .hidden = 32, .layers = 3, .heads = 4, .kv_heads = 2, .head_dim = 8, .ffn = 48, .experts = 8, .top_k = 3, .moe_ffn = 16});
  c.num_shared_experts = 1;
  c.num_groups = 4;
  c.group_top_k = 2;
  c.aux_loss_coeff = 0.01;
  c.z_loss_coeff = 0.001;
  return c;
}

TEST(GroupedSwiGLU, MatchesPerRowReferenceIncludingEmptyGroups) {
  torch::manual_seed(3);
  const std::vector<int64_t> rows = {3, 0, 5, 1, 0};
  const at::Tensor x = at::randn({9, 12}, at::kDouble).requires_grad_();
  const at::Tensor w13 = at::randn({5, 12, 14}, at::kDouble).requires_grad_();
  const at::Tensor w2 = at::randn({5, 7, 12}, at::kDouble).requires_grad_();
  const at::Tensor upstream = at::randn({9, 12}, at::kDouble);

  const at::Tensor y = grouped_swiglu(x, w13, w2, rows);
  const auto grads = torch::autograd::grad({y}, {x, w13, w2}, {upstream});
  const at::Tensor y_ref = grouped_swiglu_reference(x, w13, w2, rows);
  const auto grads_ref = torch::autograd::grad({y_ref}, {x, w13, w2}, {upstream});
  EXPECT_LT(relative_error(y, y_ref), 1e-12);
  for (size_t i = 0; i < 3; ++i) EXPECT_LT(relative_error(grads[i], grads_ref[i]), 1e-12) << "grad " << i;
  EXPECT_TRUE(at::all(grads[1][1] == 0).item<bool>());  // an empty expert gets zero gradient
}

TEST(GroupedSwiGLU, GroupedGemmPathMatchesTheLoopIncludingEmptyGroups) {
  torch::manual_seed(5);
  // Uneven groups, empty ones first, inside and last; 21 rows (not a multiple of 8).
  const std::vector<int64_t> rows = {0, 6, 0, 11, 4, 0};
  const at::Tensor x = at::randn({21, 16}).requires_grad_();
  const at::Tensor w13 = (at::randn({6, 16, 24}) * 0.2).requires_grad_();
  const at::Tensor w2 = (at::randn({6, 12, 16}) * 0.2).requires_grad_();
  const at::Tensor upstream = at::randn({21, 16});
  const at::Tensor ends = group_ends(rows, x.device());
  EXPECT_TRUE(at::equal(ends, at::tensor({0, 6, 6, 17, 21, 21}, at::kInt)));
  const at::Tensor y = grouped_swiglu_grouped_mm(x, w13, w2, ends);
  const auto grads = torch::autograd::grad({y}, {x, w13, w2}, {upstream});
  const at::Tensor y_loop = grouped_swiglu(x, w13, w2, rows);
  const auto grads_loop = torch::autograd::grad({y_loop}, {x, w13, w2}, {upstream});
  EXPECT_LT(relative_error(y, y_loop), 1e-6);
  for (size_t i = 0; i < 3; ++i) EXPECT_LT(relative_error(grads[i], grads_loop[i]), 1e-6) << "grad " << i;
  for (int64_t empty : {0, 2, 5}) {
    EXPECT_TRUE(at::all(grads[1][empty] == 0).item<bool>()) << "expert " << empty;
    EXPECT_TRUE(at::all(grads[2][empty] == 0).item<bool>()) << "expert " << empty;
  }
}

TEST(GroupedSwiGLU, GroupedGemmIsOnlyAutomaticOnCudaBf16) {
  EXPECT_FALSE(use_grouped_mm(c10::Device(c10::kCPU), at::kFloat));
  EXPECT_FALSE(use_grouped_mm(c10::Device(c10::kCPU), at::kBFloat16));
  EXPECT_TRUE(use_grouped_mm(c10::Device(c10::kCPU), at::kFloat, "on"));  // LibTorch's CPU version agrees with the loop
  EXPECT_FALSE(use_grouped_mm(c10::Device(c10::kCPU), at::kFloat, "off"));
}

// The MoE layer against a loop over tokens that routes and runs experts one
// token at a time with plain ops (FP32).
TEST(MoELayer, OutputsAndGradientsMatchNaivePerTokenLoop) {
  torch::manual_seed(11);
  const ModelConfig c = small_config();
  MoELayer layer(c);
  {
    torch::NoGradGuard no_grad;
    layer.expert_bias.copy_(at::randn({c.num_experts}) * 0.05);
  }
  const int64_t batch = 2, seq = 6, tokens = batch * seq;
  const at::Tensor h = at::randn({tokens, c.hidden_size}).requires_grad_();
  const at::Tensor upstream = at::randn({tokens, c.hidden_size});

  ForwardContext ctx;
  ctx.batch = batch;
  ctx.seq_len = seq;
  ctx.aux_loss = at::zeros({});
  ctx.z_loss = at::zeros({});
  const at::Tensor out = layer.forward(h, ctx);
  const std::vector<at::Tensor> inputs = {h, layer.router_weight, layer.w13, layer.w2, layer.shared->w13, layer.shared->w2};
  const auto grads = torch::autograd::grad({out}, inputs, {upstream});

  // Naive: per token, per chosen expert.
  const int64_t per_group = c.num_experts / c.num_groups;
  const int64_t f = c.moe_ffn_hidden_size;
  std::vector<at::Tensor> rows;
  for (int64_t t = 0; t < tokens; ++t) {
    const at::Tensor scores = at::matmul(layer.router_weight, h[t]).sigmoid();
    const at::Tensor selection = scores.detach() + layer.expert_bias;
    // Group scores: sum of each group's top-2 selection scores; keep the best group_top_k groups.
    std::vector<std::pair<float, int64_t>> groups;
    for (int64_t g = 0; g < c.num_groups; ++g) {
      auto top = std::get<0>(selection.narrow(0, g * per_group, per_group).topk(std::min<int64_t>(2, per_group)));
      groups.emplace_back(top.sum().item<float>(), g);
    }
    std::sort(groups.rbegin(), groups.rend());
    std::vector<std::pair<float, int64_t>> candidates;
    for (int64_t gi = 0; gi < c.group_top_k; ++gi) {
      for (int64_t e = groups[gi].second * per_group; e < (groups[gi].second + 1) * per_group; ++e) {
        candidates.emplace_back(selection[e].item<float>(), e);
      }
    }
    std::sort(candidates.rbegin(), candidates.rend());
    at::Tensor chosen_sum = at::zeros({});
    for (int64_t k = 0; k < c.top_k; ++k) chosen_sum = chosen_sum + scores[candidates[k].second];
    at::Tensor row = at::zeros({c.hidden_size});
    for (int64_t k = 0; k < c.top_k; ++k) {
      const int64_t e = candidates[k].second;
      const at::Tensor hid = at::matmul(h[t], layer.w13[e]);
      const at::Tensor act = at::silu(hid.narrow(0, 0, f)) * hid.narrow(0, f, f);
      row = row + scores[e] / (chosen_sum + 1e-20) * at::matmul(act, layer.w2[e]);
    }
    const int64_t fs = c.num_shared_experts * f;
    const at::Tensor sh = at::matmul(h[t], layer.shared->w13[0]);
    row = row + at::matmul(at::silu(sh.narrow(0, 0, fs)) * sh.narrow(0, fs, fs), layer.shared->w2[0]);
    rows.push_back(row);
  }
  const at::Tensor out_ref = at::stack(rows);
  const auto grads_ref = torch::autograd::grad({out_ref}, inputs, {upstream});
  EXPECT_LT(relative_error(out, out_ref), 1e-5);
  for (size_t i = 0; i < inputs.size(); ++i) EXPECT_LT(relative_error(grads[i], grads_ref[i]), 1e-5) << "input " << i;
  // Every token reached top_k experts.
  EXPECT_EQ(layer.step_load.sum().item<int64_t>(), tokens * c.top_k);
  EXPECT_GT(ctx.aux_loss.item<double>(), 0.0);
  EXPECT_GT(ctx.z_loss.item<double>(), 0.0);
}

TEST(MoELayer, PaddedAndGroupedGemmExpertsGiveTheSameResult) {
  torch::manual_seed(12);
  const ModelConfig c = small_config();
  MoELayer layer(c);
  const at::Tensor h = at::randn({16, c.hidden_size}).requires_grad_();
  std::vector<at::Tensor> outs, grads;
  // Padding 1, 8, 64 through the per-expert loop; then the GPU's route: the
  // device-side plan and grouped GEMMs (LibTorch's CPU version here).
  for (int64_t pad : {1, 8, 64, 0}) {
    ForwardContext ctx;
    ctx.batch = 2;
    ctx.seq_len = 8;
    ctx.expert_pad_multiple = std::max<int64_t>(1, pad);
    ctx.grouped_mm = pad == 0;
    ctx.aux_loss = at::zeros({});
    ctx.z_loss = at::zeros({});
    const at::Tensor out = layer.forward(h, ctx);
    outs.push_back(out);
    grads.push_back(torch::autograd::grad({out.square().sum()}, {layer.w13})[0]);
  }
  for (size_t i = 1; i < outs.size(); ++i) {
    EXPECT_LT(relative_error(outs[i], outs[0]), 1e-6);
    EXPECT_LT(relative_error(grads[i], grads[0]), 1e-6);
  }
}

TEST(Model, ParameterCountsEqualModuleNumel) {
  for (int64_t shared : {0, 2}) {
    ModelConfig c = small_config();
    c.num_shared_experts = shared;
    const MoEModel model(c);
    int64_t total = 0, experts = 0, embedding = 0;
    for (const auto& p : model.named_parameters()) {
      total += p.value().numel();
      if (p.key().find(".moe.w") != std::string::npos) experts += p.value().numel();
      if (p.key().rfind("embedding.", 0) == 0) embedding += p.value().numel();
    }
    const ParameterCounts counts = count_parameters(c);
    EXPECT_EQ(counts.total, total);
    EXPECT_EQ(counts.routed_experts, experts);
    EXPECT_EQ(counts.embedding, embedding);
    const int64_t per_expert = 3 * c.hidden_size * c.moe_ffn_hidden_size;
    EXPECT_EQ(counts.activated, total - 2 * (c.num_experts - c.top_k) * per_expert);
  }
}

TEST(Model, TrainingFlopsPerTokenHandComputed) {
  const ModelConfig c = small_config();
  const ParameterCounts p = count_parameters(c);
  const double matmul = p.activated - p.embedding - p.norms;
  const double attention = 12.0 * 16 * (4 * 8) * 3 / 2;  // 12 x seq x (H x hd) x layers, halved
  EXPECT_DOUBLE_EQ(training_flops_per_token(c, 16), 6 * matmul + attention);
}

TEST(Model, ForwardBackwardProducesFiniteLossNearLogVocab) {
  torch::manual_seed(5);
  const ModelConfig c = small_config();
  MoEModel model(c);
  const at::Tensor tokens = at::randint(c.vocab_size, {2, 9}, at::kLong);
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const ModelOutput out = model.forward(tokens, dtype);
    EXPECT_NEAR(out.ce_loss.item<double>(), std::log(97.0), 0.5);
    out.loss.backward();
    for (const auto& p : model.named_parameters()) {
      ASSERT_TRUE(p.value().grad().defined()) << p.key();
      EXPECT_TRUE(at::isfinite(p.value().grad()).all().item<bool>()) << p.key();
    }
    model.zero_grad();
  }
  EXPECT_THROW(model.forward(at::zeros({1, 40}, at::kLong), at::kFloat), std::invalid_argument);
}

TEST(ModelConfig, ValidationNamesTheField) {
  ModelConfig c = small_config();
  c.top_k = 9;
  EXPECT_EQ(c.validate().rfind("top_k:", 0), 0u) << c.validate();
  c = small_config();
  c.num_groups = 3;
  EXPECT_EQ(c.validate().rfind("num_groups:", 0), 0u);
  c = small_config();
  c.num_kv_heads = 3;
  EXPECT_EQ(c.validate().rfind("num_kv_heads:", 0), 0u);
  c = small_config();
  c.group_top_k = 1;  // one group of 2 experts cannot supply top_k = 3
  EXPECT_EQ(c.validate().rfind("group_top_k:", 0), 0u);
  EXPECT_EQ(small_config().validate(), "");
}

}  // namespace

namespace {

TEST(GroupedSwiGLU, Fp8PerGemmPathMatchesTheCpuEmulation) {
  // What a GPU runs (one fp8_mm per GEMM and group, native there) against the
  // CPU path, both emulated here: the same quantized operands, so the same
  // results up to the GEMMs' summation order. Groups padded to 128 rows as on a GPU.
  torch::manual_seed(22);
  const std::vector<int64_t> rows = {128, 0, 256};
  const at::Tensor x = at::randn({384, 128}).requires_grad_();
  const at::Tensor w13 = (at::randn({3, 128, 256}) * 0.05).requires_grad_();
  const at::Tensor w2 = (at::randn({3, 128, 128}) * 0.05).requires_grad_();
  const at::Tensor dy = at::randn({384, 128});
  const at::Tensor y = fmoe::moe::grouped_swiglu_fp8_gemms(x, w13, w2, rows);
  const auto grads = torch::autograd::grad({y}, {x, w13, w2}, {dy});
  const at::Tensor y_cpu = fmoe::moe::grouped_swiglu(x, w13, w2, rows, /*fp8=*/true);
  const auto grads_cpu = torch::autograd::grad({y_cpu}, {x, w13, w2}, {dy});
  EXPECT_LT(relative_error(y, y_cpu), 1e-5);
  for (size_t i = 0; i < 3; ++i) EXPECT_LT(relative_error(grads[i], grads_cpu[i]), 1e-5) << "grad " << i;
  EXPECT_TRUE(at::all(grads[1][1] == 0).item<bool>());  // the empty expert
  EXPECT_TRUE(at::all(grads[2][1] == 0).item<bool>());
}

TEST(GroupedSwiGLU, Fp8EmulationUsesQuantizedOperands) {
  torch::manual_seed(21);
  const std::vector<int64_t> rows = {130, 0, 70};
  const at::Tensor x = at::randn({200, 128}).requires_grad_();
  const at::Tensor w13 = (at::randn({3, 128, 256}) * 0.05).requires_grad_();
  const at::Tensor w2 = (at::randn({3, 128, 128}) * 0.05).requires_grad_();
  const at::Tensor y = fmoe::moe::grouped_swiglu(x, w13, w2, rows, /*fp8=*/true);
  // Reference: each group's GEMMs on E4M3 fake-quantized operands.
  const at::Tensor xq = fmoe::fp8::quantize_rowwise(x.detach());
  for (auto [g, offset] : {std::pair<int64_t, int64_t>{0, 0}, {2, 130}}) {
    const int64_t n = rows[static_cast<size_t>(g)];
    const at::Tensor h = at::mm(xq.narrow(0, offset, n), fmoe::fp8::quantize_blockwise(w13.detach()[g]));
    const at::Tensor a = at::silu(h.narrow(1, 0, 128)) * h.narrow(1, 128, 128);
    const at::Tensor expected = at::mm(fmoe::fp8::quantize_rowwise(a), fmoe::fp8::quantize_blockwise(w2.detach()[g]));
    EXPECT_TRUE(at::allclose(y.detach().narrow(0, offset, n), expected, 1e-5, 1e-5)) << "group " << g;
  }
  // Gradients stay close to the FP32 ones (E4M3 operands: a few percent).
  const at::Tensor dy = at::randn({200, 128});
  const auto grads = torch::autograd::grad({y}, {x, w13, w2}, {dy});
  const at::Tensor y32 = fmoe::moe::grouped_swiglu(x, w13, w2, rows);
  const auto grads32 = torch::autograd::grad({y32}, {x, w13, w2}, {dy});
  EXPECT_LT(relative_error(y, y32), 0.1);
  for (size_t i = 0; i < 3; ++i) EXPECT_LT(relative_error(grads[i], grads32[i]), 0.1) << i;
}

TEST(Model, Fp8ForwardBackwardIsCloseToFp32) {
  torch::manual_seed(8);
  ModelConfig c = small_config();
  c.hidden_size = 128;
  c.head_dim = 32;
  MoEModel model(c);
  const at::Tensor tokens = at::randint(c.vocab_size, {2, 17}, at::kLong);
  const ModelOutput fp32 = model.forward(tokens, at::kFloat);
  const ModelOutput fp8 = model.forward(tokens, at::kFloat, /*fp8=*/true);
  EXPECT_NEAR(fp8.ce_loss.item<double>(), fp32.ce_loss.item<double>(), 0.02 * fp32.ce_loss.item<double>());
  fp8.loss.backward();
  for (const auto& p : model.named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key();
    EXPECT_TRUE(at::isfinite(p.value().grad()).all().item<bool>()) << p.key();
  }
}

}  // namespace

namespace fmoe_capacity_test {

using namespace fmoe::moe;

TEST(MoELayer, CapacityFactorDropsTheLowestProbabilityAssignments) {
  torch::manual_seed(21);
  ModelConfig c = small_config();
  c.capacity_factor = 0.5;  // half of the average load: some assignments must go
  MoELayer layer(c);
  const int64_t tokens = 24;
  const at::Tensor h = at::randn({tokens, c.hidden_size});
  ForwardContext ctx;
  ctx.batch = 2;
  ctx.seq_len = 12;
  ctx.aux_loss = at::zeros({});
  ctx.z_loss = at::zeros({});
  const at::Tensor out = layer.forward(h, ctx);

  // Reference: the same routing, the capacity mask, then each kept (token, k) through its expert.
  const Routing r = route(at::linear(h, layer.router_weight), layer.expert_bias, RouterOptions::from(c));
  const int64_t capacity = expert_capacity(c.capacity_factor, tokens, c.top_k, c.num_experts);
  EXPECT_EQ(capacity, 5);  // ceil(0.5 * 24 * 3 / 8)
  const at::Tensor keep = capacity_mask(r.experts_TK, r.probs_TK, c.num_experts, capacity);
  EXPECT_LT(keep.sum().item<int64_t>(), tokens * c.top_k);
  EXPECT_LE(at::bincount(r.experts_TK.masked_select(keep), {}, c.num_experts).max().item<int64_t>(), capacity);
  const int64_t f = c.moe_ffn_hidden_size;
  const at::Tensor sh = at::matmul(h, layer.shared->w13[0]);
  at::Tensor expected = at::matmul(at::silu(sh.narrow(1, 0, f)) * sh.narrow(1, f, f), layer.shared->w2[0]);
  for (int64_t k = 0; k < c.top_k; ++k) {
    const at::Tensor e = r.experts_TK.select(1, k);
    const at::Tensor hid = at::bmm(h.unsqueeze(1), layer.w13.index_select(0, e)).squeeze(1);
    const at::Tensor act = at::silu(hid.narrow(1, 0, f)) * hid.narrow(1, f, f);
    const at::Tensor y = at::bmm(act.unsqueeze(1), layer.w2.index_select(0, e)).squeeze(1);
    expected = expected + (r.probs_TK.select(1, k) * keep.select(1, k).to(at::kFloat)).unsqueeze(1) * y;
  }
  EXPECT_LT(relative_error(out.detach(), expected.detach()), 1e-5);
}

TEST(Router, CapacityMaskHandComputed) {
  // Expert 0 gets (t0 .9) (t1 .5) (t2 .7): t1 goes. Expert 1 gets (t0 .1) (t2 .3) (t3 .6): t0 goes.
  const at::Tensor experts = at::tensor({0, 1, 0, 2, 0, 1, 1, 2}, at::kLong).view({4, 2});
  const at::Tensor probs = at::tensor({0.9f, 0.1f, 0.5f, 0.5f, 0.7f, 0.3f, 0.6f, 0.4f}).view({4, 2});
  const at::Tensor keep = capacity_mask(experts, probs, 3, 2);
  EXPECT_TRUE(at::equal(keep, at::tensor({1, 0, 0, 1, 1, 1, 1, 1}, at::kLong).view({4, 2}).to(at::kBool)));
  EXPECT_EQ(expert_capacity(1.25, 4, 2, 3), 4);
}

}  // namespace fmoe_capacity_test

namespace {

// The fused split-and-rotate equals narrow + apply_rope, forward and backward, in FP32 and BF16.
TEST(Rope, FusedSplitMatchesThePlainComposition) {
  torch::manual_seed(3);
  const int64_t heads = 4, kv_heads = 2, head_dim = 16, t = 12;
  const auto [cos, sin] = fmoe::moe::rope_tables(t, head_dim, 10000.0);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor base = at::randn({3, t, heads + 2 * kv_heads, head_dim}).to(dtype);
    const at::Tensor gq = at::randn({3, t, heads, head_dim}).to(dtype), gk = at::randn({3, t, kv_heads, head_dim}).to(dtype);
    const at::Tensor gv = at::randn({3, t, kv_heads, head_dim}).to(dtype);
    at::Tensor a = base.clone().requires_grad_(true), b = base.clone().requires_grad_(true);
    const auto fused = fmoe::moe::split_qkv_rope(a, heads, kv_heads, cos, sin);
    const at::Tensor q = fmoe::moe::apply_rope(b.narrow(2, 0, heads), cos, sin);
    const at::Tensor k = fmoe::moe::apply_rope(b.narrow(2, heads, kv_heads), cos, sin);
    const at::Tensor v = b.narrow(2, heads + kv_heads, kv_heads);
    const double tol = dtype == at::kFloat ? 1e-6 : 1e-2;
    EXPECT_LT(relative_error(fused.q_BTHd.to(at::kFloat), q.to(at::kFloat)), tol);
    EXPECT_LT(relative_error(fused.k_BTKd.to(at::kFloat), k.to(at::kFloat)), tol);
    EXPECT_TRUE(at::equal(fused.v_BTKd, v));
    ((fused.q_BTHd * gq).sum() + (fused.k_BTKd * gk).sum() + (fused.v_BTKd * gv).sum()).backward();
    ((q * gq).sum() + (k * gk).sum() + (v * gv).sum()).backward();
    EXPECT_LT(relative_error(a.grad().to(at::kFloat), b.grad().to(at::kFloat)), tol);
    EXPECT_GT(a.grad().abs().sum().item<double>(), 0);
  }
  // An unused output (no gradient) leaves zeros in its part of dqkv.
  at::Tensor c = at::randn({1, t, heads + 2 * kv_heads, head_dim}).requires_grad_(true);
  fmoe::moe::split_qkv_rope(c, heads, kv_heads, cos, sin).q_BTHd.sum().backward();
  EXPECT_EQ(c.grad().narrow(2, heads, 2 * kv_heads).abs().sum().item<double>(), 0.0);
}

}  // namespace

namespace {

TEST(RmsNorm, FusedMatchesTheAutogradComposition) {
  torch::manual_seed(5);
  for (const at::ScalarType out : {at::kFloat, at::kBFloat16}) {
    const at::Tensor x = at::randn({3, 7, 64}) * 3, w = at::randn({64}), g = at::randn({3, 7, 64});
    at::Tensor xa = x.clone().requires_grad_(true), wa = w.clone().requires_grad_(true);
    at::Tensor xb = x.clone().requires_grad_(true), wb = w.clone().requires_grad_(true);
    const at::Tensor ya = fmoe::moe::rms_norm(xa, wa, 1e-6, out), yb = fmoe::moe::rms_norm_reference(xb, wb, 1e-6, out);
    ASSERT_EQ(ya.scalar_type(), out);
    EXPECT_LT(relative_error(ya.to(at::kFloat), yb.to(at::kFloat)), 1e-6);
    ya.backward(g.to(out));
    yb.backward(g.to(out));
    EXPECT_LT(relative_error(xa.grad(), xb.grad()), 1e-5);
    EXPECT_LT(relative_error(wa.grad(), wb.grad()), 1e-5);
    EXPECT_EQ(xa.grad().scalar_type(), at::kFloat);
  }
}

}  // namespace
