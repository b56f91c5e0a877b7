#include "moe/model_config.h"

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
  if (z_loss_coeff < 0) return "z_loss_coeff: must be >= 0";
  if (rope_theta <= 0) return "rope_theta: must be > 0";
  if (norm_eps <= 0) return "norm_eps: must be > 0";
  if (init_std <= 0) return "init_std: must be > 0";
  return "";
}

ParameterCounts count_parameters(const ModelConfig& c) {
  ParameterCounts p;
  const int64_t d = c.hidden_size;
  p.embedding = c.vocab_size * d;
  p.head = c.vocab_size * d;
  const int64_t qkv = d * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim;
  const int64_t out = c.num_heads * c.head_dim * d;
  p.attention = c.num_layers * (qkv + out);
  p.norms = c.num_layers * 2 * d + d;  // two per layer plus the final norm
  p.dense_ffn = c.first_k_dense * 3 * d * c.ffn_hidden_size;
  const int64_t moe_layers = c.num_moe_layers();
  const int64_t expert = 3 * d * c.moe_ffn_hidden_size;
  p.router = moe_layers * c.num_experts * d;
  p.shared_experts = moe_layers * c.num_shared_experts * expert;
  p.routed_experts = moe_layers * c.num_experts * expert;
  p.total = p.embedding + p.head + p.attention + p.norms + p.dense_ffn + p.router + p.shared_experts + p.routed_experts;
  p.activated = p.total - moe_layers * (c.num_experts - c.top_k) * expert;
  p.activated_non_embedding = p.activated - p.embedding - p.head;
  return p;
}

double training_flops_per_token(const ModelConfig& c, int64_t seq_len) {
  const ParameterCounts p = count_parameters(c);
  // Matrices touched per token: everything activated except the embedding
  // lookup and the norms' element-wise scales.
  const double matmul_params = static_cast<double>(p.activated - p.embedding - p.norms);
  const double dense = 6.0 * matmul_params;
  // QK^T and attention x V: 2 GEMMs x 2 FLOPs x seq x (heads x head_dim), halved by the causal mask, x3 passes.
  const double attention = 3.0 * 2.0 * 2.0 * static_cast<double>(seq_len) * static_cast<double>(c.num_heads * c.head_dim) / 2.0 *
                           static_cast<double>(c.num_layers);
  return dense + attention;
}

}  // namespace fmoe::moe
