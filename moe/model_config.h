// The model's shape and routing hyper-parameters, and what follows from them
// alone: parameter counts and training FLOPs per token. No LibTorch here, so the
// planner and the config schema can use it cheaply.
#pragma once

#include <cstdint>
#include <string>

namespace fmoe::moe {

enum class ScoreFunction { kSoftmax, kSigmoid };

// Rotary scaling for context extension. YaRN (as DeepSeek-V3 uses it): the
// rotary frequencies interpolated by `factor` below the correction range set by
// beta_fast / beta_slow rotations over original_max_position_embeddings,
// extrapolated above it; cos/sin scaled by yarn_mscale(factor, mscale) /
// yarn_mscale(factor, mscale_all_dim) and, under MLA, the softmax scale by
// yarn_mscale(factor, mscale_all_dim)^2 (mscale_all_dim 0: neither).
struct RopeScaling {
  std::string type = "none";  // none | yarn
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
  bool yarn() const { return type == "yarn"; }
};

// 0.1 m ln(scale) + 1 for scale > 1, else 1 (YaRN's attention temperature).
double yarn_mscale(double scale, double m);

struct ModelConfig {
  int64_t vocab_size = 8192;
  int64_t hidden_size = 256;
  int64_t num_layers = 6;
  int64_t num_heads = 4;
  int64_t num_kv_heads = 4;            // < num_heads: grouped-query attention
  int64_t head_dim = 64;
  int64_t ffn_hidden_size = 1024;      // dense SwiGLU layers
  int64_t first_k_dense = 1;           // the first k layers are dense, the rest MoE
  int64_t max_seq_len = 256;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  double norm_eps = 1e-6;
  double init_std = 0.02;

  // MoE (Megatron's key names)
  int64_t num_experts = 16;
  int64_t top_k = 4;
  int64_t moe_ffn_hidden_size = 256;
  int64_t num_shared_experts = 1;
  ScoreFunction score_function = ScoreFunction::kSigmoid;
  int64_t num_groups = 1;              // group-limited (node-limited) routing: expert groups
  int64_t group_top_k = 1;             // groups a token may use
  bool norm_topk_prob = true;          // renormalise the top-k weights to sum to 1
  double route_scale = 1.0;
  double expert_bias_update_rate = 1e-3;  // aux-loss-free balancing; 0 disables
  double aux_loss_coeff = 1e-4;        // sequence-wise balance loss
  double z_loss_coeff = 0.0;
  // 0: dropless. Else each expert takes at most ceil(capacity_factor * tokens * top_k /
  // num_experts) of a rank's assignments per micro-batch, highest probability first;
  // the rest are dropped (they contribute nothing; the shared experts still run).
  double capacity_factor = 0.0;

  std::string attention = "mha";       // mha (MHA / GQA) | mla (multi-head latent attention)
  int64_t q_lora_rank = 0;             // mla: query down-projection rank; 0 = full-rank query
  int64_t kv_lora_rank = 512;          // mla: compressed key/value rank
  int64_t qk_nope_head_dim = 128;      // mla: per-head query/key dims without rotary
  int64_t qk_rope_head_dim = 64;       // mla: per-head rotary dims (the key's are shared)
  int64_t v_head_dim = 128;            // mla: per-head value dims
  // Multi-token prediction (DeepSeek-V3): D sequential modules, module k
  // predicting the token k + 1 ahead; the loss adds mtp_loss_weight / D x the
  // sum of their cross-entropies.
  int64_t mtp_depth = 0;
  double mtp_loss_weight = 0.1;
  bool attention_bias = false;         // biases on the query/key/value projections (Qwen2)
  bool shared_expert_gate = false;     // a sigmoid gate on the shared experts' output (Qwen2)

  // Empty when valid, else "field: why" naming the first bad field.
  std::string validate() const;
  int64_t num_moe_layers() const { return num_layers - first_k_dense; }
  bool is_mla() const { return attention == "mla"; }
  // Per-head query/key and value widths of the attention core.
  int64_t qk_head_dim() const { return is_mla() ? qk_nope_head_dim + qk_rope_head_dim : head_dim; }
  int64_t value_head_dim() const { return is_mla() ? v_head_dim : head_dim; }
  // Width of the rotary part of a query/key head.
  int64_t rope_dim() const { return is_mla() ? qk_rope_head_dim : head_dim; }
  // The attention's softmax scale: qk_head_dim^-1/2, times YaRN's mscale^2 under MLA.
  double softmax_scale() const;
  // Empty when MoEModel can build this config, else "field: why".
  std::string trainer_support() const;
  bool is_moe_layer(int64_t layer) const { return layer >= first_k_dense; }
};

struct ParameterCounts {
  int64_t embedding = 0;
  int64_t head = 0;
  int64_t attention = 0;   // all layers, projections only
  int64_t norms = 0;
  int64_t dense_ffn = 0;
  int64_t router = 0;
  int64_t shared_experts = 0;
  int64_t routed_experts = 0;
  int64_t mtp = 0;         // multi-token-prediction modules (not in total, as publishers count)
  int64_t total = 0;
  int64_t activated = 0;                 // per token: top_k routed experts of each MoE layer
  int64_t activated_non_embedding = 0;   // activated minus embedding and head
};

ParameterCounts count_parameters(const ModelConfig& config);

// Parameters of one transformer layer's attention (projections, their biases and
// MLA's latent norms).
int64_t attention_parameters(const ModelConfig& config);

// Training FLOPs per token (forward + backward = 3 GEMM passes, 2 FLOPs per
// multiply-add), Megatron-LM's accounting: every activated matrix, the router and
// the head, plus causal attention scores and context at seq_len (halved for the
// mask); with MTP modules, their layers, projections and an extra logits GEMM each.
double training_flops_per_token(const ModelConfig& config, int64_t seq_len);

}  // namespace fmoe::moe
