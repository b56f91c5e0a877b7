// Transformer building blocks. The residual stream is FP32 [tokens, hidden];
// GEMM inputs are cast to the compute dtype (BF16 or FP32) at use, so FP32
// master weights receive FP32 gradients through the cast's backward.
#pragma once

#include <torch/nn/module.h>

#include <utility>
#include <vector>

#include "moe/model_config.h"
#include "moe/router.h"
#include "parallel/mesh.h"

namespace fmoe::moe {

enum class ExpertDispatcher { kAllToAll, kAllGather };

// This rank's place in tensor and expert parallelism (moe/expert_parallel.h,
// parallel/tensor_parallel.h). The default is one process holding everything.
struct Parallelism {
  parallel::Mesh mesh = parallel::Mesh::single();
  ExpertDispatcher dispatcher = ExpertDispatcher::kAllToAll;
  // With tp > 1: the residual stream between tensor-parallel regions is split
  // over tp along the tokens; regions are entered by all-gather and left by
  // reduce-scatter instead of all-reduce.
  bool sequence_parallel = false;
  // The all-to-all dispatcher splits each MoE layer's tokens in two chunks whose
  // exchanges overlap the other chunk's expert compute (dispatch_all_to_all).
  bool ep_overlap = false;
  bool sp() const { return sequence_parallel && mesh.shape().tp > 1; }
  parallel::Communicator& tp() const { return mesh.tp(); }
  parallel::Communicator& ep() const { return mesh.ep(); }
  // One process holding everything (what layers see when nobody says otherwise).
  static const Parallelism& none();
};

// What every layer needs to know about the current micro-batch.
struct ForwardContext {
  at::ScalarType compute_dtype = at::kFloat;
  int64_t expert_pad_multiple = 1;  // see make_dispatch_plan
  // Routed experts through LibTorch's grouped GEMM with device-side group ends (use_grouped_mm).
  bool grouped_mm = false;
  // FP8 GEMMs for the attention projections, dense FFNs and experts; embedding,
  // head, router, norms and the attention core stay in high precision.
  bool fp8 = false;
  int64_t batch = 0;
  int64_t seq_len = 0;
  at::Tensor rope_cos_TH;   // fp32 [seq_len, rope_dim / 2]
  at::Tensor rope_sin_TH;
  at::Tensor aux_loss;      // fp32 scalar, sum over MoE layers (with coefficients)
  at::Tensor z_loss;
  const Parallelism* parallel = &Parallelism::none();  // the model's, when it runs the layer
};

// cos/sin tables [seq_len, head_dim / 2] for rotary embeddings (half-split
// convention), with YaRN's frequencies and cos/sin scale when scaling asks.
std::pair<at::Tensor, at::Tensor> rope_tables(int64_t seq_len, int64_t head_dim, double theta, const RopeScaling& scaling = {});
// The plain rotation (the reference that moe/rope.h's fused split-and-rotate is tested against).
at::Tensor apply_rope(const at::Tensor& x_BTHd, const at::Tensor& cos_TH, const at::Tensor& sin_TH);

// x W^T in the context's precision: an FP8 linear, or a GEMM in the compute dtype.
at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const ForwardContext& ctx);

class RMSNorm : public torch::nn::Module {
 public:
  RMSNorm(int64_t dim, double eps);
  // fp32 in, compute dtype out.
  at::Tensor forward(const at::Tensor& x_ND, at::ScalarType out_dtype);
  // {s, norm(s)} for s = x + delta (the residual add before the norm, in the same pass).
  std::pair<at::Tensor, at::Tensor> forward_residual(const at::Tensor& x_ND, const at::Tensor& delta_ND, at::ScalarType out_dtype);
  at::Tensor weight;

 private:
  double eps_;
};

// QK-clip (MuonClip) bookkeeping of one attention: with record on, every
// forward under autograd (training, not validation) keeps each head's largest
// pre-softmax logit over the causal positions, the max over the step's
// micro-batches (FP32 [local heads]; undefined until recorded).
struct QkClipState {
  bool record = false;
  at::Tensor max_logit;
  void add(const at::Tensor& q_BHTd, const at::Tensor& k_BHTd, double scale);
};

class Attention : public torch::nn::Module {
 public:
  explicit Attention(const ModelConfig& config);
  at::Tensor forward(const at::Tensor& h_ND, const ForwardContext& ctx);
  // Under tensor parallelism each rank holds H / tp query and Hkv / tp key/value heads.
  at::Tensor wqkv;  // [(H + 2 * Hkv) * head_dim, D]
  at::Tensor bqkv;  // [(H + 2 * Hkv) * head_dim] with model.attention_bias (Qwen2), else undefined
  at::Tensor wo;    // [D, H * head_dim]
  QkClipState qk_clip;
  // Scales the query and key rows (and biases) so that head h's logits are
  // multiplied by gamma[h] (FP32 [local heads], <= 1): a key head shared by a
  // group of query heads takes sqrt of the group's smallest gamma, each query
  // head the rest of its own.
  void clip_heads(const at::Tensor& gamma);

 private:
  int64_t num_heads_, num_kv_heads_, head_dim_;
};

// Multi-head latent attention (DeepSeek-V2/V3). Queries from the hidden state
// (full rank) or through a normed latent of q_lora_rank; keys and values from
// one normed latent of kv_lora_rank, up-projected per head, plus one rotary key
// of qk_rope_head_dim shared by every head; softmax scale config.softmax_scale().
// Under tensor parallelism the up-projections and wo are split by heads and the
// down-projections and their norms replicated (their gradients are partial
// sums over tp, added up like sequence-parallel norms').
class MLAttention : public torch::nn::Module {
 public:
  explicit MLAttention(const ModelConfig& config);
  at::Tensor forward(const at::Tensor& h_ND, const ForwardContext& ctx);
  at::Tensor wq;      // [H * (nope + rope), D] when q_lora_rank == 0
  at::Tensor wq_a;    // [q_lora_rank, D]
  at::Tensor wq_b;    // [H * (nope + rope), q_lora_rank]
  at::Tensor wkv_a;   // [kv_lora_rank + rope, D]
  at::Tensor wkv_b;   // [H * (nope + v), kv_lora_rank]
  at::Tensor wo;      // [D, H * v]
  std::shared_ptr<RMSNorm> q_a_norm, kv_a_norm;
  QkClipState qk_clip;
  // MuonClip's rule for MLA: head h's non-rotary query and key rows scale by
  // sqrt(gamma[h]), its rotary query rows by gamma[h]; the rotary key, shared
  // by every head, is left alone. Its logits are multiplied by gamma[h].
  void clip_heads(const at::Tensor& gamma);

 private:
  int64_t num_heads_, nope_, rope_, v_dim_, kv_rank_;
  double scale_;
};

// SwiGLU FFN; also the shared experts of an MoE layer. Under tensor parallelism
// w13 is column-parallel and w2 row-parallel (F / tp each).
class DenseFFN : public torch::nn::Module {
 public:
  DenseFFN(int64_t hidden, int64_t ffn_hidden);
  at::Tensor forward(const at::Tensor& h_ND, const ForwardContext& ctx);
  at::Tensor w13;  // [1, D, 2F]: gate and up projections fused
  at::Tensor w2;   // [1, F, D]
};

class MoELayer : public torch::nn::Module {
 public:
  explicit MoELayer(const ModelConfig& config);
  // Returns the fp32 [tokens, D] output; adds its aux and z losses to ctx.
  at::Tensor forward(const at::Tensor& h_ND, ForwardContext& ctx);

  at::Tensor router_weight;  // fp32 [E, D]
  at::Tensor w13;            // [E, D, 2F]
  at::Tensor w2;             // [E, F, D]
  at::Tensor expert_bias;    // buffer, fp32 [E]
  at::Tensor step_load;      // buffer, int64 [E]: tokens routed per expert since the last reset
  at::Tensor last_experts_TK;  // the experts the last forward chose per token (not a buffer)
  std::shared_ptr<DenseFFN> shared;  // null without shared experts
  // [1, D] with model.shared_expert_gate (Qwen2-MoE): the shared experts' output
  // is scaled per token by sigmoid(h . shared_gate); else undefined.
  at::Tensor shared_gate;

 private:
  ModelConfig config_;
  RouterOptions router_options_;
};

class TransformerLayer : public torch::nn::Module {
 public:
  TransformerLayer(const ModelConfig& config, int64_t layer_index);
  at::Tensor forward(const at::Tensor& x_ND, ForwardContext& ctx);

  std::shared_ptr<RMSNorm> attention_norm, ffn_norm;
  std::shared_ptr<Attention> attention;  // exactly one of attention / mla is set
  std::shared_ptr<MLAttention> mla;
  std::shared_ptr<DenseFFN> dense;  // exactly one of dense / moe is set
  std::shared_ptr<MoELayer> moe;
  // The attention's QK-clip bookkeeping (either kind).
  QkClipState& qk_clip() { return attention ? attention->qk_clip : mla->qk_clip; }
};

}  // namespace fmoe::moe
