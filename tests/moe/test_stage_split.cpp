// Pipeline stage splits: costs per item agree with the model's FLOPs, the
// automatic split is the best contiguous one (against brute force), written
// layouts parse, print back, and are refused in one line naming the problem.
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <stdexcept>

#include "moe/stage_split.h"

namespace {

using namespace fmoe::moe;

ModelConfig four_layers() {
  ModelConfig c = fmoe::testing::test_model({.vocab = 8192, .hidden = 256, .layers = 4, .heads = 4, .kv_heads = 2, .head_dim = 64,
                                              .ffn = 1024, .experts = 16, .top_k = 4, .moe_ffn = 256, .max_seq_len = 256});
  c.num_shared_experts = 1;
  return c;
}

TEST(StageSplit, ItemCostsAddUpToTheModelsFlops) {
  const ModelConfig c = four_layers();
  const std::vector<double> costs = stage_item_costs(c, 256);
  ASSERT_EQ(costs.size(), 6u);  // E, 4 layers, L
  EXPECT_DOUBLE_EQ(costs[0], 2.0 * 256);
  double sum = 0;
  for (double x : costs) sum += x;
  // The same matrices and attention core as training_flops_per_token, plus the
  // embedding's scatter-add and the loss's element-wise softmax.
  EXPECT_NEAR(sum - 2.0 * 256 - 4.0 * 8192, training_flops_per_token(c, 256), 1e-6 * sum);
  // The three MoE layers cost the same; the dense one (d x 3 x 1024) differs from them.
  EXPECT_DOUBLE_EQ(costs[2], costs[3]);
  EXPECT_NE(costs[1], costs[2]);
}

// The cheapest costliest stage over every contiguous split, by enumeration.
double brute_force(const std::vector<double>& costs, int64_t stages) {
  const int64_t n = static_cast<int64_t>(costs.size());
  double best = std::numeric_limits<double>::infinity();
  std::vector<int64_t> cuts;
  std::function<void(int64_t, int64_t)> walk = [&](int64_t start, int64_t left) {
    if (left == 1) {
      double worst = 0, stage = 0;
      int64_t from = 0;
      std::vector<int64_t> all = cuts;
      all.push_back(n);
      for (int64_t end : all) {
        stage = 0;
        for (int64_t i = from; i < end; ++i) stage += costs[static_cast<size_t>(i)];
        worst = std::max(worst, stage);
        from = end;
      }
      best = std::min(best, worst);
      return;
    }
    for (int64_t cut = start + 1; cut <= n - (left - 1); ++cut) {
      cuts.push_back(cut);
      walk(cut, left - 1);
      cuts.pop_back();
    }
  };
  walk(0, stages);
  return best;
}

TEST(StageSplit, MoreStagesThanItemsLeaveMiddleStagesEmpty) {
  ModelConfig c = four_layers();
  c.num_layers = 3;  // E t t t L: five items over eight stages
  const StageSplit split = balance_stages(c, 256, 8);
  ASSERT_EQ(split.stages.size(), 8u);
  EXPECT_TRUE(split.stages.front().embedding);
  EXPECT_TRUE(split.stages.back().head);
  int64_t placed = 0, empty = 0;
  for (const PipelineStage& s : split.stages) placed += s.num_layers, empty += !(s.num_layers > 0 || s.embedding || s.head);
  EXPECT_EQ(placed, 3);
  EXPECT_EQ(empty, 3);
}

TEST(StageSplit, BalancedSplitIsTheBestContiguousOne) {
  for (int64_t layers : {3, 4, 7, 10}) {
    for (int64_t dense : {0, 1, 3}) {
      ModelConfig c = four_layers();
      c.num_layers = layers;
      c.first_k_dense = std::min(dense, layers);
      const std::vector<double> costs = stage_item_costs(c, 256);
      for (int64_t stages = 2; stages <= std::min<int64_t>(6, layers + 2); ++stages) {
        const StageSplit split = balance_stages(c, 256, stages);
        ASSERT_EQ(static_cast<int64_t>(split.stages.size()), stages);
        double worst = 0;
        int64_t placed = 0, next = 0;
        for (const PipelineStage& s : split.stages) {
          worst = std::max(worst, s.cost);
          EXPECT_TRUE(s.num_layers > 0 || s.embedding || s.head) << "an empty stage with enough items";
          if (s.num_layers > 0) {
            EXPECT_EQ(s.first_layer, next);
          }
          next = s.first_layer + s.num_layers;
          placed += s.num_layers;
        }
        EXPECT_EQ(placed, layers);
        EXPECT_TRUE(split.stages.front().embedding);
        EXPECT_TRUE(split.stages.back().head);
        EXPECT_NEAR(worst, brute_force(costs, stages), 1e-9 * worst) << layers << " layers, " << stages << " stages";
      }
    }
  }
}

TEST(StageSplit, AHeavyHeadGetsAStageWithFewerLayers) {
  // Vocabulary 8192 x 256: the head costs about as much as one MoE layer here, so the
  // last of two stages takes one layer fewer than the first.
  const StageSplit split = balance_stages(four_layers(), 256, 2);
  EXPECT_EQ(split.describe(), "E t*3 | t L");
  EXPECT_GT(split.imbalance(), 1.0);
}

TEST(StageSplit, WrittenLayoutsParseAndPrintBack) {
  const ModelConfig c = four_layers();
  const StageSplit split = parse_stage_layout("E t t | t t L", c, 256, 2);
  ASSERT_EQ(split.stages.size(), 2u);
  EXPECT_TRUE(split.stages[0].embedding);
  EXPECT_EQ(split.stages[0].first_layer, 0);
  EXPECT_EQ(split.stages[0].num_layers, 2);
  EXPECT_EQ(split.stages[1].first_layer, 2);
  EXPECT_TRUE(split.stages[1].head);
  EXPECT_EQ(split.describe(), "E t*2 | t*2 L");
  EXPECT_EQ(parse_stage_layout("Et*2|t*2L", c, 256, 2).describe(), "E t*2 | t*2 L");
  // Empty stages are allowed, and a stage may hold only dense layers.
  const StageSplit sparse = parse_stage_layout("E | t | t*3 | L", c, 256, 4);
  EXPECT_EQ(sparse.describe(), "E | t | t*3 | L");
  EXPECT_EQ(sparse.stages[1].first_layer, 0);
  EXPECT_EQ(sparse.stages[3].num_layers, 0);
  EXPECT_DOUBLE_EQ(sparse.stages[1].cost, stage_item_costs(c, 256)[1]);
}

TEST(StageSplit, BadLayoutsAreRefusedNamingTheProblem) {
  const ModelConfig c = four_layers();
  const auto message = [&](const std::string& layout, int64_t stages) {
    try {
      parse_stage_layout(layout, c, 256, stages);
    } catch (const std::invalid_argument& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  EXPECT_EQ(message("E t t | t L", 2), "pipeline layout 'E t t | t L': places 3 of the 4 layers: layer 3 is missing");
  EXPECT_EQ(message("E t*3 | t*2 L", 2), "pipeline layout 'E t*3 | t*2 L': layer 4 is placed but the model has 4 layers (0 to 3)");
  EXPECT_EQ(message("E t*4 L", 2), "pipeline layout 'E t*4 L': has 1 stages; pp x virtual_pp is 2");
  EXPECT_EQ(message("t E t*3 | L", 2), "pipeline layout 't E t*3 | L': E (the embedding) must open the first stage");
  EXPECT_EQ(message("E t*2 L | t*2", 2), "pipeline layout 'E t*2 L | t*2': L (the head and loss) must close the last stage");
  EXPECT_EQ(message("t*4 | L", 2), "pipeline layout 't*4 | L': E (the embedding) is missing");
  EXPECT_EQ(message("E t*2 | x t*2 L", 2),
            "pipeline layout 'E t*2 | x t*2 L': unknown token 'x' (E embedding, t layer, L head and loss, | between stages, t*N for N layers)");
  EXPECT_EQ(message("E t* | t*4 L", 2), "pipeline layout 'E t* | t*4 L': '*' must be followed by a count");
}

}  // namespace
