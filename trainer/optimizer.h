// AdamW with decoupled weight decay over named parameters, and the learning-
// rate schedules. Which parameter kinds decay is configurable; the state is a
// flat name -> tensor map so checkpoints restore it exactly.
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

#include "fp8/low_precision_tensor.h"
#include "parallel/mesh.h"
#include "parallel/tensor_parallel.h"
#include "config/config.h"
#include "moe/matrices.h"
#include "moe/model_config.h"
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

// The parameters optimizer.name: muon takes: the hidden weight matrices
// (moe::weight_matrices; the rest stays with AdamW).
moe::WeightMatrices muon_matrices(const std::string& name, at::IntArrayRef shape, const OptimizerConfig& config,
                                  const moe::ModelConfig* model = nullptr);

// Newton-Schulz orthogonalization of each matrix of G ([matrices, rows, cols],
// FP32): the quintic iteration X <- a X + (b A + c A^2) X, A = X X^T, from X =
// G / ||G||_F, with (a, b, c) = (3.4445, -4.7750, 2.0315): singular values are
// pushed into about [0.7, 1.2] (not exactly 1: the coefficients trade accuracy
// for speed), directions kept.
// dtype: the iteration's GEMMs (FP32, or BF16 as the reference implementations
// run it); the input is normalized in FP32 and the result returned in FP32.
at::Tensor newton_schulz(const at::Tensor& G, int64_t steps, at::ScalarType dtype = at::kFloat);

// The training state's optimizer: AdamW, or under optimizer.name: muon Muon for
// the hidden matrices (muon_matrices) beside AdamW for the rest. Master
// weights, moments (Muon's momentum is kept as exp_avg, with its dtype) and
// gradients are kept in the configured storage dtypes. With everything FP32 the
// AdamW part runs multi-tensor (foreach) kernels; otherwise each parameter's
// state is loaded to FP32, updated and stored back, and the working weights are
// refreshed from the (rounded) master copy.
//
// Muon, per matrix: M <- lerp(M, G, 1 - momentum); U = lerp(G, M, momentum)
// (Nesterov) or M; O = newton_schulz(U); W <- W (1 - lr wd) - lr s O with s =
// 0.2 sqrt(max(rows, cols)) (muon_scale rms: O's RMS becomes about 0.2, AdamW's
// typical update RMS, so one learning rate serves both) or sqrt(max(1, fan_out
// / fan_in)) (muon_scale shape). The AdamW parameters take adamw_lr (when set)
// scaled by the same schedule.
class Optimizer {
 public:
  Optimizer(std::vector<NamedParameter> parameters, const OptimizerConfig& config, const moe::ModelConfig* model = nullptr);
  // Under tensor parallelism: Muon's matrices split over tp (specs by parameter
  // name) are all-gathered whole for the iteration, each orthogonalized on one
  // tp rank (owners dealt largest first, round-robin) and broadcast back; every
  // rank keeps its shard. Collective over tp in step() (every tp rank updates the
  // same parameters, in the same order).
  void set_tensor_parallel(const parallel::Mesh& mesh, const std::map<std::string, parallel::ShardSpec>& specs);
  // After a parameter was changed in place (QK-clip), its master copy follows
  // (and the working copy becomes what the master stores); a no-op without one
  // or for a parameter this optimizer does not update.
  void refresh_master(const at::Tensor& param);
  // The dtype of Muon's Newton-Schulz GEMMs (FP32 until set; the trainer sets the run's GEMM dtype).
  void set_matrix_dtype(at::ScalarType dtype) { matrix_dtype_ = dtype; }
  // Rounds the gradients to grad_dtype, as if they had been stored in it (FP4:
  // Muon's matrices only, stochastically, seeded by name and step; the AdamW
  // parameters' gradients in FP8). Call before clipping.
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
  void step_muon(double lr);
  void store_master(size_t i, const at::Tensor& value);
  uint32_t rounding_seed(size_t i, uint32_t salt) const;
  // Parameter i's gradient dtype: grad_dtype, except FP8 for the AdamW parameters under FP4 / NVFP4.
  fp8::StorageDtype grad_dtype_of(size_t i) const;
  at::Tensor muon_update(const at::Tensor& u, const moe::WeightMatrices& m) const;

  std::vector<NamedParameter> params_;
  // exp_avg_ holds Muon's momentum for its matrices, whose exp_avg_sq_ entries are empty.
  std::vector<fp8::LowPrecisionTensor> exp_avg_, exp_avg_sq_, master_;  // master_ empty when FP32
  std::vector<moe::WeightMatrices> muon_;  // matrix: Muon updates it (split over tp: the gathered tensor's matrices)
  std::vector<size_t> muon_members_;
  at::ScalarType matrix_dtype_ = at::kFloat;
  const moe::ModelConfig* model_ = nullptr;
  const parallel::Mesh* tp_mesh_ = nullptr;   // set when some Muon matrix is split over tp
  std::vector<parallel::ShardSpec> tp_spec_;  // per parameter: its tp split alone (tp_dim -1: whole here)
  std::vector<int> tp_owner_;                 // per parameter: the tp rank that orthogonalizes it
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
