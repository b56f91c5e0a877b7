// The step's scalars by name: what the one device-to-host copy of a step
// (parallel::StepReadback) brings back, in the order the step added them.
#pragma once

#include <cstddef>
#include <vector>

#include "parallel/device_readback.h"

namespace fmoe::trainer {

using parallel::StepReadback;
using parallel::StepTimer;

// The step's scalars by name, from what read() returned for the values the
// step added in this order: the losses (cross-entropy, aux, z, then one per MTP
// depth), the gradient norm, each MoE layer's (max, mean) expert load and its
// busiest expert-parallel rank's load over the mean rank's, then
// with QK-clip each attention layer's largest logit and the heads clipped.
struct StepScalars {
  double loss = 0, aux_loss = 0, z_loss = 0, grad_norm = 0;
  std::vector<double> mtp_losses;           // one per MTP depth
  std::vector<double> load_max, load_mean;  // one per MoE layer
  std::vector<double> load_rank_imbalance;  // one per MoE layer: 1 without expert parallelism
  // QK-clip: this rank's attention layers' largest logits, then the heads clipped (empty when off).
  std::vector<double> max_logits;
  double clipped_heads = 0;
  static StepScalars unpack(const std::vector<double>& values, size_t mtp_depth, size_t moe_layers, size_t logit_layers = 0);
};

}  // namespace fmoe::trainer
