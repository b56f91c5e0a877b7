#include "moe/model_config.h"

#include <cmath>

namespace fmoe::moe {
namespace {

std::string positive(const char* name, int64_t value) {
  return value > 0 ? "" : std::string(name) + ": must be > 0, got " + std::to_string(value);
}

}  // namespace

std::string ModelConfig::validate() const {
  for (auto [name, value] : {std::pair{"vocab_size", vocab_size}, {"hidden_size", hidden_size},
                             {"num_layers", num_layers}, {"num_heads", num_heads},
                             {"num_kv_heads", num_kv_heads}, {"head_dim", head_dim},
                             {"max_seq_len", max_seq_len}, {"num_groups", num_groups},
                             {"group_top_k", group_top_k}}) {
    if (auto error = positive(name, value); !error.empty()) return error;
  }
  if (num_heads % num_kv_heads != 0) {
    return "num_kv_heads: must divide num_heads (" + std::to_string(num_heads) + "), got " + std::to_string(num_kv_heads);
  }
  if (head_dim % 2 != 0) return "head_dim: must be even for rotary embeddings, got " + std::to_string(head_dim);
  if (first_k_dense < 0 || first_k_dense > num_layers) {
    return "first_k_dense: must be in [0, num_layers=" + std::to_string(num_layers) + "], got " + std::to_string(first_k_dense);
  }
  if (first_k_dense > 0 && ffn_hidden_size <= 0) return "ffn_hidden_size: must be > 0 when first_k_dense > 0";
  if (num_moe_layers() > 0) {
    if (auto error = positive("num_experts", num_experts); !error.empty()) return error;
    if (auto error = positive("moe_ffn_hidden_size", moe_ffn_hidden_size); !error.empty()) return error;
    if (top_k < 1 || top_k > num_experts) {
      return "top_k: must be in [1, num_experts=" + std::to_string(num_experts) + "], got " + std::to_string(top_k);
    }
    if (num_shared_experts < 0) return "num_shared_experts: must be >= 0";
    if (num_experts % num_groups != 0) {
      return "num_groups: must divide num_experts (" + std::to_string(num_experts) + "), got " + std::to_string(num_groups);
    }
    if (group_top_k > num_groups) {
      return "group_top_k: must be <= num_groups (" + std::to_string(num_groups) + "), got " + std::to_string(group_top_k);
    }
    if (group_top_k * (num_experts / num_groups) < top_k) {
      return "group_top_k: the chosen groups hold " + std::to_string(group_top_k * (num_experts / num_groups)) +
             " experts, fewer than top_k=" + std::to_string(top_k);
    }
  }
  if (route_scale <= 0) return "route_scale: must be > 0";
  if (expert_bias_update_rate < 0) return "expert_bias_update_rate: must be >= 0";
  if (aux_loss_coeff < 0) return "aux_loss_coeff: must be >= 0";
  if (capacity_factor < 0) return "capacity_factor: must be >= 0 (0: dropless)";
  if (z_loss_coeff < 0) return "z_loss_coeff: must be >= 0";
  if (attention != "mha" && attention != "mla") return "attention: must be mha or mla, got '" + attention + "'";
  if (is_mla()) {
    for (auto [name, value] : {std::pair{"kv_lora_rank", kv_lora_rank}, {"qk_nope_head_dim", qk_nope_head_dim},
                               {"qk_rope_head_dim", qk_rope_head_dim}, {"v_head_dim", v_head_dim}}) {
      if (auto error = positive(name, value); !error.empty()) return error;
    }
    if (q_lora_rank < 0) return "q_lora_rank: must be >= 0";
  }
  if (mtp_depth < 0) return "mtp_depth: must be >= 0";
  if (!(mtp_loss_weight >= 0)) return "mtp_loss_weight: must be >= 0";
  if (rope_scaling.type != "none" && rope_scaling.type != "yarn") {
    return "rope_scaling.type: must be none or yarn, got '" + rope_scaling.type + "'";
  }
  if (rope_scaling.yarn()) {
    if (!(rope_scaling.factor >= 1)) return "rope_scaling.factor: must be >= 1";
    if (rope_scaling.original_max_position_embeddings < 1) return "rope_scaling.original_max_position_embeddings: must be >= 1";
    if (!(rope_scaling.beta_fast > 0) || !(rope_scaling.beta_slow > 0)) return "rope_scaling.beta_fast: beta_fast and beta_slow must be > 0";
    if (!(rope_scaling.mscale >= 0) || !(rope_scaling.mscale_all_dim >= 0)) return "rope_scaling.mscale: mscale and mscale_all_dim must be >= 0";
  }
  if (rope_dim() % 2 != 0) return std::string(is_mla() ? "qk_rope_head_dim" : "head_dim") + ": must be even (rotary pairs)";
  if (rope_theta <= 0) return "rope_theta: must be > 0";
  if (norm_eps <= 0) return "norm_eps: must be > 0";
  if (init_std <= 0) return "init_std: must be > 0";
  return "";
}

double yarn_mscale(double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }

double ModelConfig::softmax_scale() const {
  double scale = 1.0 / std::sqrt(static_cast<double>(qk_head_dim()));
  if (is_mla() && rope_scaling.yarn() && rope_scaling.mscale_all_dim > 0) {
    const double m = yarn_mscale(rope_scaling.factor, rope_scaling.mscale_all_dim);
    scale *= m * m;
  }
  return scale;
}

std::string ModelConfig::trainer_support() const {
  if (attention_bias && is_mla()) return "attention_bias: biases on MLA's projections are not implemented (attention: mha only)";
  if (shared_expert_gate && num_shared_experts == 0) return "shared_expert_gate: needs num_shared_experts > 0";
  return "";
}

int64_t attention_parameters(const ModelConfig& c) {
  const int64_t d = c.hidden_size, h = c.num_heads;
  if (!c.is_mla()) {
    const int64_t qkv = d * (h + 2 * c.num_kv_heads) * c.head_dim;
    const int64_t bias = c.attention_bias ? (h + 2 * c.num_kv_heads) * c.head_dim : 0;
    return qkv + bias + h * c.head_dim * d;
  }
  const int64_t qk = c.qk_head_dim();
  // Queries: full rank, or down-projection + norm + up-projection.
  const int64_t q = c.q_lora_rank > 0 ? d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * qk : d * h * qk;
  // Keys/values: one down-projection to the latent plus the shared rotary key, a norm,
  // and the up-projection to per-head non-rotary keys and values.
  const int64_t kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank +
                     c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim);
  return q + kv + h * c.v_head_dim * d;
}

namespace {

// One transformer layer's parameters: attention, two norms, and its FFN.
struct LayerParameters {
  int64_t attention, norms, dense_ffn, router, shared, routed, routed_activated;
};

LayerParameters layer_parameters(const ModelConfig& c, bool moe) {
  const int64_t d = c.hidden_size;
  const int64_t expert = 3 * d * c.moe_ffn_hidden_size;
  LayerParameters l{attention_parameters(c), 2 * d, 0, 0, 0, 0, 0};
  if (!moe) {
    l.dense_ffn = 3 * d * c.ffn_hidden_size;
    return l;
  }
  l.router = c.num_experts * d;
  l.shared = c.num_shared_experts * expert + (c.shared_expert_gate && c.num_shared_experts > 0 ? d : 0);
  l.routed = c.num_experts * expert;
  l.routed_activated = c.top_k * expert;
  return l;
}

}  // namespace

ParameterCounts count_parameters(const ModelConfig& c) {
  ParameterCounts p;
  const int64_t d = c.hidden_size;
  p.embedding = c.vocab_size * d;
  p.head = c.vocab_size * d;
  p.norms = d;  // the final norm
  int64_t routed_activated = 0;
  for (int64_t layer = 0; layer < c.num_layers; ++layer) {
    const LayerParameters l = layer_parameters(c, c.is_moe_layer(layer) && c.num_moe_layers() > 0);
    p.attention += l.attention;
    p.norms += l.norms;
    p.dense_ffn += l.dense_ffn;
    p.router += l.router;
    p.shared_experts += l.shared;
    p.routed_experts += l.routed;
    routed_activated += l.routed_activated;
  }
  p.total = p.embedding + p.head + p.attention + p.norms + p.dense_ffn + p.router + p.shared_experts + p.routed_experts;
  p.activated = p.total - p.routed_experts + routed_activated;
  p.activated_non_embedding = p.activated - p.embedding - p.head;
  if (c.mtp_depth > 0) {
    // DeepSeek-V3's MTP module: two norms, a [2D -> D] projection and one (MoE) layer;
    // it shares the embedding and the head with the main model.
    const LayerParameters l = layer_parameters(c, c.num_moe_layers() > 0);
    // Per module: the embedding's and hidden state's norms, the projection, one block, its final norm.
    p.mtp = c.mtp_depth * (3 * d + 2 * d * d + l.attention + l.norms + l.dense_ffn + l.router + l.shared + l.routed);
  }
  return p;
}

double training_flops_per_token(const ModelConfig& c, int64_t seq_len) {
  const ParameterCounts p = count_parameters(c);
  // Matrices touched per token: everything activated except the embedding
  // lookup and the norms' element-wise scales.
  const double matmul_params = static_cast<double>(p.activated - p.embedding - p.norms);
  // Scores (QK^T: qk_head_dim) and context (x V: value_head_dim): 2 FLOPs x seq x heads x dims,
  // halved by the causal mask, x3 passes.
  const double attention_per_layer = 3.0 * 2.0 * static_cast<double>(seq_len) *
                                     static_cast<double>(c.num_heads * (c.qk_head_dim() + c.value_head_dim())) / 2.0;
  double flops = 6.0 * matmul_params + attention_per_layer * static_cast<double>(c.num_layers);
  if (c.mtp_depth > 0) {
    const int64_t d = c.hidden_size;
    const bool moe = c.num_moe_layers() > 0;
    const double expert = 3.0 * d * c.moe_ffn_hidden_size;
    const double layer_matmul = attention_parameters(c) +
                                (moe ? c.num_experts * d + (c.top_k + c.num_shared_experts) * expert : 3.0 * d * c.ffn_hidden_size);
    // Per module: the projection, one layer, its attention core and one more logits GEMM.
    flops += c.mtp_depth * (6.0 * (2.0 * d * d + layer_matmul + static_cast<double>(p.head)) + attention_per_layer);
  }
  return flops;
}

}  // namespace fmoe::moe
