// ZeRO-1: AdamW's state sharded over data parallelism. Each parameter is owned
// by one rank of its data-parallel group (dense: dp; routed experts: the
// expert-data-parallel group), assigned largest-first to the least-loaded rank.
// A step reduce-scatters the gradients in a flat buffer laid out owner by owner
// (each rank's segment padded to the largest), so every rank receives the
// averaged gradients of exactly the parameters it owns; the local AdamW updates
// those; an all-gather of the same layout hands every rank the new weights.
// Optimizer memory per rank falls to about 1 / dp of the unsharded state.
#pragma once

#include <memory>
#include <vector>

#include "parallel/mesh.h"
#include "trainer/optimizer.h"

namespace fmoe::trainer {

using config::OptimizerConfig;
using checkpoint::TensorMap;

class Zero1 {
 public:
  // sharded_over_tp / expert: per parameter, as parallel::global_grad_square_sum takes them.
  Zero1(const std::vector<NamedParameter>& params, const std::vector<bool>& sharded_over_tp, const std::vector<bool>& expert,
        const parallel::Mesh& mesh, const OptimizerConfig& config, const moe::ModelConfig* model = nullptr);

  // Gradients averaged over data parallelism, each landing on its owner only.
  void reduce_scatter_gradients();
  // Gradient rounding to grad_dtype (owned gradients).
  void quantize_gradients() { optimizer_->quantize_gradients(); }
  void set_matrix_dtype(at::ScalarType dtype) { optimizer_->set_matrix_dtype(dtype); }
  void refresh_master(const at::Tensor& param) { optimizer_->refresh_master(param); }
  // A parameter's owner is the same dp rank on every tp rank (same shapes, same plan), so the tp group gathers together.
  void set_tensor_parallel(const parallel::Mesh& mesh, const std::map<std::string, parallel::ShardSpec>& specs) {
    optimizer_->set_tensor_parallel(mesh, specs);
  }
  // Clips the owned gradients by the global norm (every shard counted once); returns that norm.
  at::Tensor clip_grad_norm(double max_norm);
  // The optimizer on the owned parameters (whole tensors, so Muon's matrices are
  // whole on their owner), then every rank receives every parameter.
  void step(double lr);

  TensorMap state() const { return optimizer_->state(); }
  // FP32 state only (all_fp32): every parameter's moments on every rank of its
  // data-parallel group, each broadcast from its owner (collective over dp and
  // the expert-data-parallel group), as an unsharded AdamW's state() names them;
  // load_state takes the owned ones out of such a map.
  TensorMap full_state() const;
  bool all_fp32() const { return optimizer_->all_fp32(); }
  void load_state(const TensorMap& state, const std::string& source) { optimizer_->load_state(state, source); }
  StateBytes bytes_per_parameter() const { return optimizer_->bytes_per_parameter(); }
  int64_t owned_numel() const;

 private:
  struct Partition {
    parallel::Communicator* group = nullptr;
    std::vector<size_t> members;      // indices into params_
    std::vector<int64_t> owner;       // per member: the owning rank of the group
    std::vector<int64_t> offset;      // per member: offset inside its owner's segment
    int64_t segment = 0;              // elements per rank (the largest owner's share)
  };
  void gather_parameters(const Partition& partition);

  std::vector<NamedParameter> params_;
  std::vector<bool> sharded_over_tp_, expert_;
  std::vector<bool> owned_;
  std::vector<Partition> partitions_;
  const parallel::Mesh* mesh_;
  at::TensorOptions options_;  // FP32 on the parameters' device: the flat buffers
  std::unique_ptr<Optimizer> optimizer_;
  std::vector<bool> muon_;  // per parameter: Muon keeps no second moment
};

}  // namespace fmoe::trainer
