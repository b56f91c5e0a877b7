#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cmath>

#include "moe/dispatch.h"
#include "moe/router.h"

namespace {

using namespace fmoe::moe;

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

at::Tensor logits_2x4() { return at::tensor({0.0f, 1.0f, 2.0f, -1.0f, 3.0f, 0.0f, 0.0f, 1.0f}).view({2, 4}); }

RouterOptions sigmoid_top2() {
  RouterOptions o;
  o.score_function = ScoreFunction::kSigmoid;
  o.top_k = 2;
  return o;
}

TEST(Router, SigmoidTopKHandComputed) {
  const Routing r = route(logits_2x4(), at::zeros({4}), sigmoid_top2());
  EXPECT_EQ(r.experts_TK[0][0].item<int64_t>(), 2);
  EXPECT_EQ(r.experts_TK[0][1].item<int64_t>(), 1);
  EXPECT_EQ(r.experts_TK[1][0].item<int64_t>(), 0);
  EXPECT_EQ(r.experts_TK[1][1].item<int64_t>(), 3);
  const double s2 = sigmoid(2), s1 = sigmoid(1), s3 = sigmoid(3);
  EXPECT_NEAR(r.probs_TK[0][0].item<double>(), s2 / (s2 + s1), 1e-6);
  EXPECT_NEAR(r.probs_TK[0][1].item<double>(), s1 / (s2 + s1), 1e-6);
  EXPECT_NEAR(r.probs_TK[1][0].item<double>(), s3 / (s3 + s1), 1e-6);
}

TEST(Router, SoftmaxWithoutNormalisationAndRouteScale) {
  RouterOptions o = sigmoid_top2();
  o.score_function = ScoreFunction::kSoftmax;
  o.norm_topk_prob = false;
  o.route_scale = 2.5;
  const Routing r = route(logits_2x4(), at::zeros({4}), o);
  const double z = std::exp(0.0) + std::exp(1.0) + std::exp(2.0) + std::exp(-1.0);
  EXPECT_NEAR(r.probs_TK[0][0].item<double>(), 2.5 * std::exp(2.0) / z, 1e-6);
  EXPECT_NEAR(r.probs_TK[0][1].item<double>(), 2.5 * std::exp(1.0) / z, 1e-6);
}

TEST(Router, BiasSteersSelectionButNotWeights) {
  const Routing r = route(logits_2x4(), at::tensor({0.0f, 0.0f, 0.0f, 2.0f}), sigmoid_top2());
  EXPECT_EQ(r.experts_TK[0][0].item<int64_t>(), 3);  // 0.269 + 2 beats 0.881
  EXPECT_EQ(r.experts_TK[0][1].item<int64_t>(), 2);
  const double s3 = sigmoid(-1), s2 = sigmoid(2);
  EXPECT_NEAR(r.probs_TK[0][0].item<double>(), s3 / (s3 + s2), 1e-6);
}

TEST(Router, GroupLimitedSelection) {
  RouterOptions o = sigmoid_top2();
  o.num_groups = 2;
  o.group_top_k = 1;
  // Token 0: group {0,1} scores 0.5 + 0.731 = 1.231 > group {2,3} 0.881 + 0.269 = 1.150,
  // so the best expert overall (2) is excluded.
  const Routing r = route(logits_2x4(), at::zeros({4}), o);
  EXPECT_EQ(r.experts_TK[0][0].item<int64_t>(), 1);
  EXPECT_EQ(r.experts_TK[0][1].item<int64_t>(), 0);
  // Token 1: group {0,1}: 0.953 + 0.5 = 1.453 > group {2,3}: 0.5 + 0.731.
  EXPECT_EQ(r.experts_TK[1][0].item<int64_t>(), 0);
  EXPECT_EQ(r.experts_TK[1][1].item<int64_t>(), 1);

  // Softmax groups are scored by their best expert: token 0's group {2,3} wins on expert 2.
  o.score_function = ScoreFunction::kSoftmax;
  const at::Tensor mask = group_limited_mask(logits_2x4().softmax(-1), o);
  EXPECT_TRUE(at::equal(mask.to(at::kLong), at::tensor({0L, 0L, 1L, 1L, 1L, 1L, 0L, 0L}).view({2, 4})));
}

TEST(Router, ExpertBiasUpdateHandComputed) {
  at::Tensor bias = at::zeros({4});
  update_expert_bias(bias, at::tensor({10L, 0L, 5L, 5L}), 0.1);
  EXPECT_TRUE(at::allclose(bias, at::tensor({-0.1f, 0.1f, 0.0f, 0.0f})));
  update_expert_bias(bias, at::tensor({0L, 10L, 5L, 5L}), 0.1);
  EXPECT_TRUE(at::allclose(bias, at::tensor({0.0f, 0.0f, 0.0f, 0.0f})));
}

TEST(Router, SequenceBalanceLossHandComputed) {
  // One sequence of 2 tokens, 4 experts, top-2.
  const at::Tensor scores = at::tensor({0.4f, 0.3f, 0.2f, 0.1f, 0.1f, 0.1f, 0.4f, 0.4f}).view({2, 4});
  const at::Tensor experts = at::tensor({0L, 1L, 2L, 3L}).view({2, 2});
  // f_e = E / (K T) * count = 4 / 4 * 1 = 1 for every expert; P = column means of normalised scores.
  const double expected = 1.0 * (0.25 + 0.2 + 0.3 + 0.25);
  EXPECT_NEAR(sequence_balance_loss(scores, experts, 1).item<double>(), expected, 1e-6);
  // Perfectly balanced uniform routing gives exactly 1.
  EXPECT_NEAR(sequence_balance_loss(at::full({2, 4}, 0.25f), experts, 1).item<double>(), 1.0, 1e-6);
}

TEST(Router, ZLoss) {
  const at::Tensor logits = at::zeros({3, 4});
  EXPECT_NEAR(router_z_loss(logits).item<double>(), std::pow(std::log(4.0), 2), 1e-6);
}

TEST(Dispatch, PlanGroupsByExpertStably) {
  // Token 0 -> experts (2, 0), token 1 -> (0, 1), token 2 -> (1, 2).
  const at::Tensor experts = at::tensor({2L, 0L, 0L, 1L, 1L, 2L}).view({3, 2});
  const DispatchPlan plan = make_dispatch_plan(experts, 4);
  EXPECT_TRUE(at::equal(plan.tokens_per_expert_E, at::tensor({2L, 2L, 2L, 0L})));
  EXPECT_EQ(plan.rows_per_expert, (std::vector<int64_t>{2, 2, 2, 0}));
  // Rows grouped by expert, stable in token order: e0 <- t0, t1; e1 <- t1, t2; e2 <- t0, t2.
  EXPECT_TRUE(at::equal(plan.gather_index_P, at::tensor({0L, 1L, 1L, 2L, 0L, 2L})));
  EXPECT_TRUE(at::equal(plan.slot_rows_TK, at::tensor({4L, 0L, 1L, 2L, 3L, 5L}).view({3, 2})));

  const at::Tensor x = at::tensor({1.0f, 2.0f, 3.0f}).view({3, 1});
  EXPECT_TRUE(at::equal(permute_tokens(x, plan).view({-1}), at::tensor({1.0f, 2.0f, 2.0f, 3.0f, 1.0f, 3.0f})));
  // Combine: y = 10 * row index, weights from probs.
  const at::Tensor y = at::arange(6, at::kFloat).mul(10).view({6, 1});
  const at::Tensor probs = at::tensor({0.5f, 0.25f, 1.0f, 2.0f, 3.0f, 4.0f}).view({3, 2});
  // token 0: rows 4, 0 -> 0.5*40 + 0.25*0 = 20; token 1: rows 1, 2 -> 10 + 40 = 50; token 2: rows 3, 5 -> 90 + 200 = 290
  EXPECT_TRUE(at::allclose(unpermute_and_combine(y, probs, plan).view({-1}), at::tensor({20.0f, 50.0f, 290.0f})));
}

TEST(Dispatch, PaddingRoundsGroupsUpWithZeroRows) {
  const at::Tensor experts = at::tensor({2L, 0L, 0L, 1L, 1L, 2L}).view({3, 2});
  const DispatchPlan plan = make_dispatch_plan(experts, 4, /*pad_multiple=*/4);
  EXPECT_EQ(plan.rows_per_expert, (std::vector<int64_t>{4, 4, 4, 0}));
  // Padding rows gather row T = 3 (the zero row).
  EXPECT_TRUE(at::equal(plan.gather_index_P, at::tensor({0L, 1L, 3L, 3L, 1L, 2L, 3L, 3L, 0L, 2L, 3L, 3L})));
  EXPECT_TRUE(at::equal(plan.slot_rows_TK, at::tensor({8L, 0L, 1L, 4L, 5L, 9L}).view({3, 2})));
  const at::Tensor x = at::tensor({1.0f, 2.0f, 3.0f}).view({3, 1});
  const at::Tensor permuted = permute_tokens(x, plan).view({-1});
  EXPECT_TRUE(at::equal(permuted, at::tensor({1.0f, 2.0f, 0.0f, 0.0f, 2.0f, 3.0f, 0.0f, 0.0f, 1.0f, 3.0f, 0.0f, 0.0f})));
  // Padded and unpadded plans combine to the same output.
  const at::Tensor probs = at::rand({3, 2});
  const at::Tensor y_unpadded = at::randn({6, 5});
  const DispatchPlan dense = make_dispatch_plan(experts, 4);
  at::Tensor y_padded = at::zeros({12, 5});
  y_padded.index_copy_(0, plan.slot_rows_TK.reshape({-1}), y_unpadded.index_select(0, dense.slot_rows_TK.reshape({-1})));
  EXPECT_TRUE(at::allclose(unpermute_and_combine(y_padded, probs, plan), unpermute_and_combine(y_unpadded, probs, dense)));
}

}  // namespace

namespace {

// The largest number of distinct expert-parallel ranks any token's experts live on,
// rank r holding experts [r * E / ep, (r + 1) * E / ep).
int64_t max_ranks_per_token(const at::Tensor& experts_TK, int64_t num_experts, int64_t ep) {
  const at::Tensor ranks = experts_TK.div(num_experts / ep, "floor");
  const at::Tensor hit = at::zeros({experts_TK.size(0), ep}, at::kLong).scatter_(1, ranks, 1);
  return hit.sum(1).max().item<int64_t>();
}

}  // namespace

TEST(Router, GroupLimitsBoundTheExpertParallelRanksATokenReaches) {
  // DeepSeek's node-limited routing is group-limited routing whose groups are the
  // experts of one rank (or node): with num_groups a multiple of ep, a token's
  // experts live on at most group_top_k ranks, so its all-to-all rows go to at most that many.
  at::manual_seed(3);
  const at::Tensor logits = at::randn({512, 16});
  RouterOptions o;
  o.top_k = 4;
  o.num_groups = 4;
  o.group_top_k = 2;
  const Routing limited = route(logits, at::zeros({16}), o);
  EXPECT_LE(max_ranks_per_token(limited.experts_TK, 16, 4), 2);
  EXPECT_LE(max_ranks_per_token(limited.experts_TK, 16, 2), 2);
  o.num_groups = 1;
  o.group_top_k = 1;
  const Routing free = route(logits, at::zeros({16}), o);
  EXPECT_GT(max_ranks_per_token(free.experts_TK, 16, 4), 2);  // without the limit some token spreads wider
}

namespace {

using namespace fmoe::moe;

TEST(Dispatch, DevicePlanEqualsTheHostPlanWithoutHostCounts) {
  // Token 0 -> experts (2, 0), token 1 -> (0, 1), token 2 -> (1, 2); expert 3 gets nothing.
  const at::Tensor experts = at::tensor({2L, 0L, 0L, 1L, 1L, 2L}).view({3, 2});
  const DispatchPlan host = make_dispatch_plan(experts, 4);
  const DispatchPlan device = make_device_dispatch_plan(experts, 4);
  EXPECT_TRUE(device.rows_per_expert.empty());
  EXPECT_TRUE(at::equal(device.tokens_per_expert_E, at::tensor({2L, 2L, 2L, 0L})));
  EXPECT_TRUE(at::equal(device.ends_E, at::tensor({2, 4, 6, 6}, at::kInt)));
  EXPECT_TRUE(at::equal(host.ends_E, device.ends_E));
  EXPECT_TRUE(at::equal(device.gather_index_P, host.gather_index_P));
  EXPECT_TRUE(at::equal(device.slot_rows_TK, host.slot_rows_TK));
  const at::Tensor x = at::tensor({1.0f, 2.0f, 3.0f}).view({3, 1});
  EXPECT_TRUE(at::equal(permute_tokens(x, device), permute_tokens(x, host)));
}

TEST(Dispatch, DevicePlanOnRandomRoutingMatchesAndCountsAgree) {
  torch::manual_seed(11);
  const at::Tensor experts = at::randint(0, 16, {257, 3}, at::kLong);
  const DispatchPlan host = make_dispatch_plan(experts, 16);
  const DispatchPlan device = make_device_dispatch_plan(experts, 16);
  EXPECT_TRUE(at::equal(device.gather_index_P, host.gather_index_P));
  EXPECT_TRUE(at::equal(device.slot_rows_TK, host.slot_rows_TK));
  EXPECT_TRUE(at::equal(device.tokens_per_expert_E, host.tokens_per_expert_E));
  EXPECT_TRUE(at::equal(count_per_expert(experts, 16), at::bincount(experts.reshape({-1}), {}, 16)));
  // The padded host plan's ends count the padding rows.
  const DispatchPlan padded = make_dispatch_plan(experts, 16, /*pad_multiple=*/8);
  EXPECT_EQ(padded.ends_E[15].item<int>(), padded.gather_index_P.size(0));
}

}  // namespace
