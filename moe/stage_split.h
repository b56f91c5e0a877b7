// Pipeline stages as contiguous slices of the model's stage list: the
// embedding (E), the transformer layers (t), the output head with the loss (L).
// A split is either balanced automatically by cost or written out as a layout
// string in Megatron's style, stages separated by '|', "t*3" for three layers:
//   "E t t | t t | t t L"   or   "E t*2 | t*2 | t*2 L"
// Empty stages are allowed in a written layout. With v chunks per rank there
// are pp x v stages, placed on ranks by the schedule (parallel::stage_placement:
// stage c x pp + r on rank r, or DualPipeV's V). No LibTorch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "moe/model_config.h"

namespace fmoe::moe {

struct PipelineStage {
  bool embedding = false;    // holds the embedding (the first stage)
  bool head = false;         // holds the head and the loss (the last stage)
  int64_t first_layer = 0;   // transformer layers [first_layer, first_layer + num_layers)
  int64_t num_layers = 0;
  double cost = 0;           // training FLOPs per token of what it holds
};

struct StageSplit {
  std::vector<PipelineStage> stages;
  // The layout string of this split ("E t*2 | t*2 | t*2 L").
  std::string describe() const;
  // The costliest stage over the mean: how much slower than a perfect split the pipeline runs.
  double imbalance() const;
};

// Training FLOPs per token of each item of the stage list, in order: the
// embedding (its gradient's scatter-add), every layer (projections, experts,
// router and the attention core at seq_len), the head with the loss.
std::vector<double> stage_item_costs(const ModelConfig& config, int64_t seq_len);

// The contiguous split of the stage list into `stages` stages whose costliest
// stage is cheapest (every stage holds at least one item when there are enough;
// otherwise some middle stages are empty, never the first or the last).
StageSplit balance_stages(const ModelConfig& config, int64_t seq_len, int64_t stages);

// A written layout for `stages` stages. Throws std::invalid_argument with one
// line that quotes the layout and names the problem: an unknown token, a stage
// count other than `stages`, E not first or L not last (or missing or repeated),
// or layers not placed exactly once ("places 5 of the 6 layers: layer 5 is
// missing", "layer 6 is placed but the model has 6 layers (0 to 5)").
StageSplit parse_stage_layout(const std::string& layout, const ModelConfig& config, int64_t seq_len, int64_t stages);

}  // namespace fmoe::moe
