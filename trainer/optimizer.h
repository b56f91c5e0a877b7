// AdamW with decoupled weight decay over named parameters, and the learning-
// rate schedules. Which parameter kinds decay is configurable; the state is a
// flat name -> tensor map so checkpoints restore it exactly.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

#include "fp8/low_precision_tensor.h"
#include "parallel/mesh.h"
#include "config/config.h"
#include "checkpoint/safetensors.h"

namespace fmoe::trainer {

using config::OptimizerConfig;
using checkpoint::TensorMap;

enum class ParamKind { kEmbedding, kHead, kNorm, kRouter, kExpert, kDense };

// Classifies a parameter by its module path (see moe/model.h for the names).
ParamKind classify_parameter(const std::string& name);
bool decays(ParamKind kind, const OptimizerConfig& config);

struct NamedParameter {
  std::string name;
  at::Tensor tensor;
};

// Bytes per parameter of each part of the training state, for the memory report.
struct StateBytes {
  double weights = 0;     // the FP32 working copy the forward reads (autograd needs it on CPU)
  double master = 0;      // master weights when stored apart from the working copy, else 0
  double grads = 0;       // gradients in grad_dtype
  double exp_avg = 0;
  double exp_avg_sq = 0;
  // master (or the working copy when it is the master) + grads + moments.
  double training_state() const { return (master > 0 ? master : weights) + grads + exp_avg + exp_avg_sq; }
  std::string format() const;
};

// AdamW whose master weights, moments and gradients are kept in the configured
// storage dtypes. With everything FP32 it runs multi-tensor (foreach) kernels;
// otherwise each parameter's state is loaded to FP32, updated and stored back,
// and the working weights are refreshed from the (rounded) master copy.
class AdamW {
 public:
  AdamW(std::vector<NamedParameter> parameters, const OptimizerConfig& config);
  // Rounds the gradients to grad_dtype, as if they had been stored in it. Call before clipping.
  void quantize_gradients();
  // One update with learning rate lr from the parameters' current .grad().
  void step(double lr);
  TensorMap state() const;
  // Whether every part of the state is FP32 (moments shaped like their parameters, no master copy).
  bool all_fp32() const { return all_fp32_; }
  // Restores state(); throws naming source and the missing or mismatched tensor.
  void load_state(const TensorMap& state, const std::string& source);
  int64_t steps_taken() const { return steps_taken_; }
  StateBytes bytes_per_parameter() const;

 private:
  struct Group {
    double weight_decay;
    std::vector<size_t> members;
  };
  void step_fused(double lr);
  void step_stored(double lr, double bias_correction1, double bias_correction2);

  std::vector<NamedParameter> params_;
  std::vector<fp8::LowPrecisionTensor> exp_avg_, exp_avg_sq_, master_;  // master_ empty when FP32
  std::vector<Group> groups_;
  OptimizerConfig config_;
  fp8::StorageDtype grad_dtype_;
  bool all_fp32_;
  int64_t steps_taken_ = 0;
};

// Learning rate at optimizer step (0-based): linear warmup, then cosine,
// warmup-stable-decay or constant.
double learning_rate(const OptimizerConfig& config, int64_t step, int64_t total_steps);

// Global L2 norm of the gradients; scales them down to max_norm when above it
// (max_norm 0: no clipping). Returns the norm before clipping, an FP64 scalar
// on the gradients' device (read it when the step's scalars go to the host).
at::Tensor clip_grad_norm(const std::vector<at::Tensor>& grads, double max_norm);

// The same over a model sharded on a mesh: the norm counts every shard once
// (parallel::global_grad_square_sum), so all ranks scale by the same factor.
at::Tensor clip_grad_norm(const std::vector<at::Tensor>& grads, const std::vector<bool>& sharded_over_tp,
                          const std::vector<bool>& expert, const parallel::Mesh& mesh, double max_norm);

// Scales grads by min(1, max_norm / total) without reading total on the host.
void scale_to_norm(const std::vector<at::Tensor>& grads, const at::Tensor& total, double max_norm);

}  // namespace fmoe::trainer
