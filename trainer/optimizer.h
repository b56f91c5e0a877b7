// AdamW with decoupled weight decay over named parameters, and the learning-
// rate schedules. Which parameter kinds decay is configurable; the state is a
// flat name -> tensor map so checkpoints restore it exactly.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "trainer/config.h"
#include "trainer/safetensors.h"

namespace fmoe::trainer {

enum class ParamKind { kEmbedding, kHead, kNorm, kRouter, kExpert, kDense };

// Classifies a parameter by its module path (see moe/model.h for the names).
ParamKind classify_parameter(const std::string& name);
bool decays(ParamKind kind, const OptimizerConfig& config);

struct NamedParameter {
  std::string name;
  at::Tensor tensor;
};

class AdamW {
 public:
  AdamW(std::vector<NamedParameter> parameters, const OptimizerConfig& config);
  // One update with learning rate lr from the parameters' current .grad().
  void step(double lr);
  TensorMap state() const;
  // Restores state(); throws naming source and the missing or mismatched tensor.
  void load_state(const TensorMap& state, const std::string& source);
  int64_t steps_taken() const { return steps_taken_; }

 private:
  struct Group {
    double weight_decay;
    std::vector<size_t> members;
  };
  std::vector<NamedParameter> params_;
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  std::vector<Group> groups_;
  OptimizerConfig config_;
  int64_t steps_taken_ = 0;
};

// Learning rate at optimizer step (0-based): linear warmup, then cosine,
// warmup-stable-decay or constant.
double learning_rate(const OptimizerConfig& config, int64_t step, int64_t total_steps);

// Global L2 norm of the gradients; scales them down to max_norm when above it
// (max_norm 0: no clipping). Returns the norm before clipping.
double clip_grad_norm(const std::vector<at::Tensor>& grads, double max_norm);

}  // namespace fmoe::trainer
