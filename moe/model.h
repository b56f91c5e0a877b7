// The decoder as pipeline-ready stages: an embedding stage, a list of
// transformer layers and a head stage. A pipeline stage later owns a contiguous
// slice of this list; nothing here assumes one module holds the whole model.
#pragma once

#include <torch/nn/module.h>

#include <map>
#include <string>
#include <vector>

#include "moe/layers.h"
#include "moe/model_config.h"
#include "moe/stage_split.h"
#include "parallel/tensor_parallel.h"

namespace fmoe::moe {

// Under tensor parallelism the embedding and the head hold V / tp vocabulary
// rows each (vocabulary-parallel; the loss never gathers the vocabulary).
class EmbeddingStage : public torch::nn::Module {
 public:
  EmbeddingStage(const ModelConfig& config);
  at::Tensor forward(const at::Tensor& tokens_BT, const Parallelism& parallel);  // -> fp32 [B * T, D]
  at::Tensor weight;  // [V, D]
};

class HeadStage : public torch::nn::Module {
 public:
  HeadStage(const ModelConfig& config);
  // Mean next-token cross-entropy (natural log) over all positions, in fp32.
  at::Tensor forward(const at::Tensor& x_ND, const at::Tensor& targets_BT, at::ScalarType compute_dtype, const Parallelism& parallel);
  // The same from an already normed hidden state (the MTP modules' own norms).
  at::Tensor loss(const at::Tensor& normed_ND, const at::Tensor& targets_BT, at::ScalarType compute_dtype, const Parallelism& parallel);
  std::shared_ptr<RMSNorm> norm;
  at::Tensor weight;  // [V, D], untied from the embedding
};

// One multi-token-prediction module (DeepSeek-V3): module k combines the
// previous depth's hidden state at position i with the embedding of token
// i + k, h' = proj [norm(Emb(t_i+k)); norm(h_i)] (the order of DeepSeek's
// checkpoints), runs one transformer block over the shortened sequence and
// predicts token i + k + 1 through its own final norm and the shared head.
class MTPModule : public torch::nn::Module {
 public:
  MTPModule(const ModelConfig& config, int64_t layer_index);
  std::shared_ptr<RMSNorm> embed_norm, hidden_norm, norm;
  at::Tensor proj;  // [D, 2D]
  std::shared_ptr<TransformerLayer> block;
};

// One pipeline stage's forward: the hidden state it hands to the next stage
// (FP32 [B * T, D], or [B * T / tp, D] under sequence parallelism), or, on the
// stage with the head, the loss. aux_loss and z_loss are the stage's own MoE
// layers' terms (with their coefficients); a stage without the head backpropagates
// them beside the gradient that arrives for its output.
struct StageOutput {
  at::Tensor hidden;     // undefined on the stage with the head
  at::Tensor ce_loss;    // the head's cross-entropy (attached); undefined elsewhere
  at::Tensor aux_loss;   // attached, FP32 scalars (zero when the stage has no MoE layer)
  at::Tensor z_loss;
  // On the stage with the head, with model.mtp_depth > 0: each depth's
  // cross-entropy (FP32 [D], attached); their weighted mean is in mtp_loss.
  at::Tensor mtp_losses;
  at::Tensor mtp_loss;   // mtp_loss_weight / D x their sum (attached), or undefined
};

struct ModelOutput {
  at::Tensor loss;        // what backward runs on: cross-entropy + aux + z losses
  at::Tensor ce_loss;     // detached, for logging
  at::Tensor aux_loss;    // detached
  at::Tensor z_loss;      // detached
  at::Tensor mtp_losses;  // detached FP32 [mtp_depth] (empty without MTP)
};

class MoEModel : public torch::nn::Module {
 public:
  // Parameters are drawn from LibTorch's default generator: seed it first. Every
  // rank draws the full model and keeps its tensor- / expert-parallel shard, so
  // any layout starts from the single-process model's exact weights. Throws
  // std::invalid_argument naming the degree that does not divide a model size.
  explicit MoEModel(const ModelConfig& config, Parallelism parallel = {});

  // tokens_BT1: int64 [B, T + 1]; inputs are [:, :-1], targets [:, 1:]. The
  // loss adds the MoE aux and z losses and, with MTP, mtp_loss_weight / D x the
  // MTP modules' losses.
  // fp8: E4M3 GEMMs for the attention projections, FFNs and experts (see ForwardContext).
  ModelOutput forward(const at::Tensor& tokens_BT1, at::ScalarType compute_dtype, bool fp8 = false);

  // The part of the forward a pipeline stage holds: from the tokens (the stage
  // with the embedding) or the previous stage's hidden state, through its
  // layers, to the next stage's input or (the stage with the head) the loss.
  // tokens_BT1 is the micro-batch on every stage (the head takes its targets).
  StageOutput forward_stage(const PipelineStage& stage, const at::Tensor& tokens_BT1, const at::Tensor& hidden_in,
                            at::ScalarType compute_dtype, bool fp8 = false);
  // The whole model as one stage.
  PipelineStage whole_model_stage() const;
  // Next-token logits at every position, FP32 [B, T, V], without a graph (a
  // single-process model: conversion and inspection). Each MoE layer keeps the
  // experts it chose in last_experts_TK.
  at::Tensor logits(const at::Tensor& tokens_BT, at::ScalarType compute_dtype = at::kFloat);

  const ModelConfig& config() const { return config_; }
  const Parallelism& parallelism() const { return parallel_; }
  // How each parameter (by name) is sharded; routed-expert tensors are is_expert().
  const std::map<std::string, parallel::ShardSpec>& shard_specs() const { return specs_; }
  std::vector<std::shared_ptr<MoELayer>> moe_layers() const;
  // Every transformer layer: the main ones, then each MTP module's.
  std::vector<std::shared_ptr<TransformerLayer>> transformer_layers() const;
  // Applies the aux-loss-free bias update with the given per-layer loads
  // (already summed over data-parallel ranks) and clears step_load.
  void update_expert_biases(const std::vector<at::Tensor>& loads_E);

  std::shared_ptr<EmbeddingStage> embedding;
  std::vector<std::shared_ptr<TransformerLayer>> layers;
  std::shared_ptr<HeadStage> head;
  std::vector<std::shared_ptr<MTPModule>> mtp;  // model.mtp_depth modules, with the head

 private:
  // What every layer needs for a micro-batch of `batch` sequences of seq_len tokens.
  ForwardContext make_context(int64_t batch, int64_t seq_len, c10::Device device, at::ScalarType compute_dtype, bool fp8);
  // The MTP modules' losses from the main model's last hidden state.
  void add_mtp_losses(StageOutput& out, const at::Tensor& x_ND, const at::Tensor& tokens_BT1, ForwardContext& ctx);
  ModelConfig config_;
  Parallelism parallel_;
  std::map<std::string, parallel::ShardSpec> specs_;
  at::Tensor rope_cos_, rope_sin_;
};

}  // namespace fmoe::moe
