#include "trainer/step_readback.h"

#include <stdexcept>
#include <string>

namespace fmoe::trainer {

StepScalars StepScalars::unpack(const std::vector<double>& values, size_t mtp_depth, size_t moe_layers, size_t logit_layers) {
  const size_t norm_at = 3 + mtp_depth, loads_at = norm_at + 1, logits_at = loads_at + 3 * moe_layers;
  const size_t expected = logits_at + (logit_layers > 0 ? logit_layers + 1 : 0);
  if (values.size() != expected) {
    throw std::logic_error("step readback: " + std::to_string(values.size()) + " values, expected " + std::to_string(expected));
  }
  StepScalars s;
  s.loss = values[0];
  s.aux_loss = values[1];
  s.z_loss = values[2];
  s.mtp_losses.assign(values.begin() + 3, values.begin() + static_cast<long>(norm_at));
  s.grad_norm = values[norm_at];
  for (size_t i = 0; i < moe_layers; ++i) {
    s.load_max.push_back(values[loads_at + 3 * i]);
    s.load_mean.push_back(values[loads_at + 3 * i + 1]);
    s.load_rank_imbalance.push_back(values[loads_at + 3 * i + 2]);
  }
  if (logit_layers > 0) {
    s.max_logits.assign(values.begin() + static_cast<long>(logits_at), values.begin() + static_cast<long>(logits_at + logit_layers));
    s.clipped_heads = values[logits_at + logit_layers];
  }
  return s;
}

}  // namespace fmoe::trainer
