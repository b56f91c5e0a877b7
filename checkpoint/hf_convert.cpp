#include "checkpoint/hf_convert.h"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>
#include <stdexcept>

#include "common/file_util.h"

namespace fmoe::checkpoint {
namespace {

using nlohmann::json;

json read_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot open");
  try {
    return json::parse(in);
  } catch (const std::exception& e) {
    throw std::runtime_error(path + ": not valid JSON (" + std::string(e.what()).substr(0, 120) + ")");
  }
}

// The rotary rows of each block: DeepSeek's interleaved pairs (2i, 2i + 1) to
// half-split pairs (i, i + rope / 2), or back (inverse).
at::Tensor permute_rope_rows(const at::Tensor& w, int64_t block_rows, int64_t offset, int64_t rope, bool inverse) {
  const at::Tensor to_half = at::cat({at::arange(0, rope, 2, at::kLong), at::arange(1, rope, 2, at::kLong)});
  const at::Tensor order = inverse ? at::argsort(to_half) : to_half;
  at::Tensor blocks = w.reshape({-1, block_rows, w.size(-1)}).clone();
  blocks.narrow(1, offset, rope).copy_(blocks.narrow(1, offset, rope).index_select(1, order));
  return blocks.reshape(w.sizes());
}

std::string shape_text(at::IntArrayRef shape) {
  std::ostringstream out;
  out << shape;
  return out.str();
}

// The folder's tensors by Hugging Face name, consumed one by one.
class Source {
 public:
  explicit Source(const std::string& dir) : dir_(dir) {
    const std::string index = dir + "/model.safetensors.index.json";
    std::set<std::string> files;
    if (std::filesystem::exists(index)) {
      const json j = read_json(index);
      if (!j.contains("weight_map") || !j["weight_map"].is_object()) throw std::runtime_error(index + ": no weight_map");
      for (const auto& [name, file] : j["weight_map"].items()) files.insert(file.get<std::string>());
    } else if (std::filesystem::exists(dir + "/model.safetensors")) {
      files.insert("model.safetensors");
    } else {
      throw std::runtime_error(dir + ": neither model.safetensors nor model.safetensors.index.json");
    }
    for (const std::string& file : files) {
      for (auto& [name, tensor] : read_safetensors(dir + "/" + file)) {
        if (name.size() > 16 && name.rfind("weight_scale_inv") == name.size() - 16) {
          throw std::runtime_error(dir + "/" + file + ": tensor '" + name + "': FP8 block-quantized weights; dequantize them to BF16 first");
        }
        where_[name] = file;
        tensors_[name] = tensor.to(at::kFloat);
      }
    }
  }

  bool has(const std::string& name) const { return tensors_.count(name) > 0; }

  // The tensor, which must have `shape`.
  at::Tensor take(const std::string& name, at::IntArrayRef shape) {
    const auto it = tensors_.find(name);
    if (it == tensors_.end()) throw std::runtime_error(dir_ + ": tensor '" + name + "' is missing");
    at::Tensor t = it->second;
    if (!t.sizes().equals(shape)) {
      throw std::runtime_error(dir_ + "/" + where_[name] + ": tensor '" + name + "' has shape " + shape_text(t.sizes()) +
                               ", config.json implies " + shape_text(shape));
    }
    tensors_.erase(it);
    return t;
  }

  // Drops every tensor under prefix; returns how many.
  int64_t drop_prefix(const std::string& prefix) {
    int64_t n = 0;
    for (auto it = tensors_.begin(); it != tensors_.end();) {
      if (it->first.rfind(prefix, 0) == 0) {
        it = tensors_.erase(it);
        ++n;
      } else {
        ++it;
      }
    }
    return n;
  }

  // Refuses what nothing consumed (buffers transformers recomputes are skipped).
  void check_all_taken() const {
    for (const auto& [name, tensor] : tensors_) {
      if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;
      throw std::runtime_error(dir_ + "/" + where_.at(name) + ": unexpected tensor '" + name + "' (not part of the configured model)");
    }
  }

 private:
  std::string dir_;
  std::map<std::string, at::Tensor> tensors_;
  std::map<std::string, std::string> where_;
};

// config.json's keys, with the file named in every error.
class Keys {
 public:
  Keys(json j, std::string path) : j_(std::move(j)), path_(std::move(path)) {}
  bool has(const std::string& key) const { return j_.contains(key) && !j_[key].is_null(); }
  int64_t integer(const std::string& key) const {
    if (!has(key) || !j_[key].is_number_integer()) throw std::runtime_error(path_ + ": key '" + key + "': expected an integer");
    return j_[key].get<int64_t>();
  }
  int64_t integer(const std::string& key, int64_t fallback) const { return has(key) ? integer(key) : fallback; }
  double number(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_number()) throw std::runtime_error(path_ + ": key '" + key + "': expected a number");
    return j_[key].get<double>();
  }
  bool boolean(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_boolean()) throw std::runtime_error(path_ + ": key '" + key + "': expected true or false");
    return j_[key].get<bool>();
  }
  std::string text(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    if (!j_[key].is_string()) throw std::runtime_error(path_ + ": key '" + key + "': expected a string");
    return j_[key].get<std::string>();
  }
  std::vector<int64_t> integers(const std::string& key) const {
    std::vector<int64_t> out;
    if (!has(key)) return out;
    if (!j_[key].is_array()) throw std::runtime_error(path_ + ": key '" + key + "': expected a list of integers");
    for (const auto& v : j_[key]) {
      if (!v.is_number_integer()) throw std::runtime_error(path_ + ": key '" + key + "': expected a list of integers");
      out.push_back(v.get<int64_t>());
    }
    return out;
  }
  Keys child(const std::string& key) const { return Keys(has(key) ? j_[key] : json::object(), path_ + " " + key); }
  [[noreturn]] void refuse(const std::string& key, const std::string& why) const { throw std::runtime_error(path_ + ": key '" + key + "': " + why); }

 private:
  json j_;
  std::string path_;
};

// rope_theta and YaRN from transformers' rope_parameters, or the older rope_theta + rope_scaling.
void read_rope(const Keys& k, moe::ModelConfig& m) {
  const Keys params = k.has("rope_parameters") ? k.child("rope_parameters") : k.child("rope_scaling");
  m.rope_theta = k.has("rope_parameters") ? params.number("rope_theta", 10000.0) : k.number("rope_theta", 10000.0);
  const std::string type = params.text("rope_type", params.text("type", "default"));
  if (type == "default") return;
  if (type != "yarn") k.refuse("rope_parameters", "rope type '" + type + "' is not supported (default or yarn)");
  m.rope_scaling.type = "yarn";
  m.rope_scaling.factor = params.number("factor", 1.0);
  m.rope_scaling.original_max_position_embeddings = params.integer("original_max_position_embeddings", 4096);
  m.rope_scaling.beta_fast = params.number("beta_fast", 32.0);
  m.rope_scaling.beta_slow = params.number("beta_slow", 1.0);
  m.rope_scaling.mscale = params.number("mscale", 1.0);
  m.rope_scaling.mscale_all_dim = params.number("mscale_all_dim", 0.0);
}

void common_checks(const Keys& k) {
  if (k.boolean("tie_word_embeddings", false)) k.refuse("tie_word_embeddings", "tied embeddings are not supported (FrugalMoE's head is its own)");
  if (k.text("hidden_act", "silu") != "silu") k.refuse("hidden_act", "only silu (SwiGLU) is supported");
  if (k.boolean("attention_bias", false)) k.refuse("attention_bias", "attention biases are not supported");
}

// The shape every architecture spells alike in config.json.
void read_shape(const Keys& k, moe::ModelConfig& m, double norm_eps_default) {
  m.vocab_size = k.integer("vocab_size");
  m.hidden_size = k.integer("hidden_size");
  m.num_layers = k.integer("num_hidden_layers");
  m.num_heads = k.integer("num_attention_heads");
  m.num_kv_heads = k.integer("num_key_value_heads", m.num_heads);
  m.head_dim = k.integer("head_dim", m.hidden_size / m.num_heads);
  m.max_seq_len = k.integer("max_position_embeddings");
  m.norm_eps = k.number("rms_norm_eps", norm_eps_default);
  m.top_k = k.integer("num_experts_per_tok");
}

at::Tensor experts_w13(Source& src, const std::string& prefix, const char* gate, const char* up, int64_t experts, int64_t d, int64_t f) {
  std::vector<at::Tensor> per;
  for (int64_t e = 0; e < experts; ++e) {
    const std::string p = prefix + std::to_string(e) + ".";
    per.push_back(at::cat({src.take(p + gate + ".weight", {f, d}).t(), src.take(p + up + ".weight", {f, d}).t()}, 1));
  }
  return at::stack(per);
}

at::Tensor experts_w2(Source& src, const std::string& prefix, const char* down, int64_t experts, int64_t d, int64_t f) {
  std::vector<at::Tensor> per;
  for (int64_t e = 0; e < experts; ++e) per.push_back(src.take(prefix + std::to_string(e) + "." + down + ".weight", {d, f}).t());
  return at::stack(per);
}

void import_mlp(Source& src, const std::string& hf, const std::string& ours, int64_t d, int64_t f, TensorMap& out) {
  out[ours + ".w13"] = at::cat({src.take(hf + ".gate_proj.weight", {f, d}).t(), src.take(hf + ".up_proj.weight", {f, d}).t()}, 1).unsqueeze(0);
  out[ours + ".w2"] = src.take(hf + ".down_proj.weight", {d, f}).t().unsqueeze(0);
}

// The embedding, the final norm and the output head: the same names everywhere.
void import_ends(Source& src, const moe::ModelConfig& m, TensorMap& t) {
  t["embedding.weight"] = src.take("model.embed_tokens.weight", {m.vocab_size, m.hidden_size});
  t["head.norm.weight"] = src.take("model.norm.weight", {m.hidden_size});
  t["head.weight"] = src.take("lm_head.weight", {m.vocab_size, m.hidden_size});
}

void import_layer_norms(Source& src, const std::string& hf, const std::string& ours, int64_t d, TensorMap& t) {
  t[ours + "attention_norm.weight"] = src.take(hf + "input_layernorm.weight", {d});
  t[ours + "ffn_norm.weight"] = src.take(hf + "post_attention_layernorm.weight", {d});
}

// Grouped-query attention (Mixtral, Qwen2-MoE): q, k, v stacked into wqkv (and their biases into bqkv).
void import_gqa(Source& src, const std::string& a, const std::string& ours, const moe::ModelConfig& m, TensorMap& t) {
  const int64_t d = m.hidden_size, q_rows = m.num_heads * m.head_dim, kv_rows = m.num_kv_heads * m.head_dim;
  const auto stacked = [&](const char* suffix, bool bias) {
    const auto shape = [&](int64_t rows) { return bias ? std::vector<int64_t>{rows} : std::vector<int64_t>{rows, d}; };
    return at::cat({src.take(a + "q_proj." + suffix, shape(q_rows)), src.take(a + "k_proj." + suffix, shape(kv_rows)),
                    src.take(a + "v_proj." + suffix, shape(kv_rows))});
  };
  t[ours + "attention.wqkv"] = stacked("weight", false);
  if (m.attention_bias) t[ours + "attention.bqkv"] = stacked("bias", true);
  t[ours + "attention.wo"] = src.take(a + "o_proj.weight", {d, q_rows});
}

// Softmax routing over every expert, unscaled, without a correction bias (Mixtral, Qwen2-MoE).
void plain_softmax_routing(const Keys& k, moe::ModelConfig& m, bool norm_topk_prob) {
  m.score_function = moe::ScoreFunction::kSoftmax;
  m.num_groups = m.group_top_k = 1;
  m.norm_topk_prob = norm_topk_prob;
  m.route_scale = 1.0;
  m.expert_bias_update_rate = 0;
  m.aux_loss_coeff = k.number("router_aux_loss_coef", 0.001);
}

// DeepseekV3, or DeepseekV2 (v2): softmax routing, greedy or group-limited by
// each group's best score, weights not renormalised (transformers' DeepseekV2
// ignores norm_topk_prob), no correction bias.
HfModel import_deepseek(const Keys& k, Source& src, bool v2) {
  HfModel r;
  moe::ModelConfig& m = r.config;
  common_checks(k);
  if (k.boolean("mlp_bias", false)) k.refuse("mlp_bias", "MLP biases are not supported");
  if (!v2 && k.text("scoring_func", "sigmoid") != "sigmoid") k.refuse("scoring_func", "DeepseekV3 routes by sigmoid");
  read_shape(k, m, 1e-6);
  m.num_kv_heads = m.num_heads;  // MLA: every head has its own key and value
  m.ffn_hidden_size = k.integer("intermediate_size");
  m.first_k_dense = k.integer("first_k_dense_replace", 0);
  m.num_experts = k.integer("n_routed_experts");
  m.moe_ffn_hidden_size = k.integer("moe_intermediate_size");
  m.num_shared_experts = k.integer("n_shared_experts", 0);
  m.score_function = v2 ? moe::ScoreFunction::kSoftmax : moe::ScoreFunction::kSigmoid;
  m.num_groups = k.integer("n_group", 1);
  m.group_top_k = k.integer("topk_group", 1);
  m.norm_topk_prob = k.boolean("norm_topk_prob", true);
  m.route_scale = k.number("routed_scaling_factor", 1.0);
  if (v2) {
    const std::string method = k.text("topk_method", "greedy");
    if (method == "greedy") {
      m.num_groups = m.group_top_k = 1;
    } else if (method != "group_limited_greedy") {
      k.refuse("topk_method", "'" + method + "' is not supported for DeepseekV2 (greedy, group_limited_greedy)");
    }
    if (m.norm_topk_prob) r.notes.push_back("norm_topk_prob is true, but DeepseekV2 never renormalises its top-k weights: imported as false");
    m.norm_topk_prob = false;
    m.expert_bias_update_rate = 0;  // DeepseekV2 balances by auxiliary losses, without a correction bias
    m.aux_loss_coeff = k.number("aux_loss_alpha", 0.001);
  }
  m.attention = "mla";
  m.q_lora_rank = k.integer("q_lora_rank", 0);
  m.kv_lora_rank = k.integer("kv_lora_rank");
  m.qk_nope_head_dim = k.integer("qk_nope_head_dim");
  m.qk_rope_head_dim = k.integer("qk_rope_head_dim");
  m.v_head_dim = k.integer("v_head_dim");
  m.head_dim = m.qk_head_dim();
  read_rope(k, m);
  if (const std::string error = m.validate(); !error.empty()) throw std::runtime_error("config.json: model." + error);
  const bool interleaved = v2 || k.boolean("rope_interleave", true);  // DeepseekV2 rotates interleaved pairs always
  const int64_t d = m.hidden_size, h = m.num_heads, qk = m.qk_head_dim(), nope = m.qk_nope_head_dim, rope = m.qk_rope_head_dim;
  // DeepSeek's own checkpoints hold the MTP modules as layers past the last one.
  const int64_t mtp = k.integer("num_nextn_predict_layers", 0);
  int64_t dropped = 0;
  for (int64_t l = m.num_layers; l < m.num_layers + mtp; ++l) dropped += src.drop_prefix("model.layers." + std::to_string(l) + ".");
  if (mtp > 0) {
    r.notes.push_back("multi-token prediction (num_nextn_predict_layers " + std::to_string(mtp) + ", " + std::to_string(dropped) +
                      " tensors) is not imported: the model trains without it");
  }
  TensorMap& t = r.tensors;
  import_ends(src, m, t);
  const auto rope_rows = [&](const at::Tensor& w, int64_t block_rows, int64_t offset) {
    return interleaved ? permute_rope_rows(w, block_rows, offset, rope, /*inverse=*/false) : w;
  };
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const std::string hf = "model.layers." + std::to_string(l) + ".", ours = "layers." + std::to_string(l) + ".";
    import_layer_norms(src, hf, ours, d, t);
    const std::string a = hf + "self_attn.";
    if (m.q_lora_rank > 0) {
      t[ours + "attention.wq_a"] = src.take(a + "q_a_proj.weight", {m.q_lora_rank, d});
      t[ours + "attention.q_a_norm.weight"] = src.take(a + "q_a_layernorm.weight", {m.q_lora_rank});
      t[ours + "attention.wq_b"] = rope_rows(src.take(a + "q_b_proj.weight", {h * qk, m.q_lora_rank}), qk, nope);
    } else {
      t[ours + "attention.wq"] = rope_rows(src.take(a + "q_proj.weight", {h * qk, d}), qk, nope);
    }
    t[ours + "attention.wkv_a"] = rope_rows(src.take(a + "kv_a_proj_with_mqa.weight", {m.kv_lora_rank + rope, d}), m.kv_lora_rank + rope, m.kv_lora_rank);
    t[ours + "attention.kv_a_norm.weight"] = src.take(a + "kv_a_layernorm.weight", {m.kv_lora_rank});
    t[ours + "attention.wkv_b"] = src.take(a + "kv_b_proj.weight", {h * (nope + m.v_head_dim), m.kv_lora_rank});
    t[ours + "attention.wo"] = src.take(a + "o_proj.weight", {d, h * m.v_head_dim});
    if (!m.is_moe_layer(l)) {
      import_mlp(src, hf + "mlp", ours + "ffn", d, m.ffn_hidden_size, t);
      continue;
    }
    const int64_t f = m.moe_ffn_hidden_size;
    t[ours + "moe.router_weight"] = src.take(hf + "mlp.gate.weight", {m.num_experts, d});
    t[ours + "moe.expert_bias"] = !v2 && src.has(hf + "mlp.gate.e_score_correction_bias")
                                      ? src.take(hf + "mlp.gate.e_score_correction_bias", {m.num_experts})
                                      : at::zeros({m.num_experts});
    t[ours + "moe.w13"] = experts_w13(src, hf + "mlp.experts.", "gate_proj", "up_proj", m.num_experts, d, f);
    t[ours + "moe.w2"] = experts_w2(src, hf + "mlp.experts.", "down_proj", m.num_experts, d, f);
    if (m.num_shared_experts > 0) import_mlp(src, hf + "mlp.shared_experts", ours + "moe.shared", d, f * m.num_shared_experts, t);
  }
  return r;
}

HfModel import_mixtral(const Keys& k, Source& src) {
  HfModel r;
  moe::ModelConfig& m = r.config;
  common_checks(k);
  if (k.has("sliding_window")) k.refuse("sliding_window", "sliding-window attention is not supported");
  read_shape(k, m, 1e-5);
  m.first_k_dense = 0;
  m.num_experts = k.integer("num_local_experts");
  m.moe_ffn_hidden_size = m.ffn_hidden_size = k.integer("intermediate_size");
  m.num_shared_experts = 0;
  plain_softmax_routing(k, m, /*norm_topk_prob=*/true);
  read_rope(k, m);
  if (const std::string error = m.validate(); !error.empty()) throw std::runtime_error("config.json: model." + error);
  const int64_t d = m.hidden_size, f = m.moe_ffn_hidden_size;
  TensorMap& t = r.tensors;
  import_ends(src, m, t);
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const std::string hf = "model.layers." + std::to_string(l) + ".", ours = "layers." + std::to_string(l) + ".";
    import_layer_norms(src, hf, ours, d, t);
    import_gqa(src, hf + "self_attn.", ours, m, t);
    const std::string moe = hf + "block_sparse_moe.";
    t[ours + "moe.router_weight"] = src.take(moe + "gate.weight", {m.num_experts, d});
    t[ours + "moe.expert_bias"] = at::zeros({m.num_experts});
    t[ours + "moe.w13"] = experts_w13(src, moe + "experts.", "w1", "w3", m.num_experts, d, f);
    t[ours + "moe.w2"] = experts_w2(src, moe + "experts.", "w2", m.num_experts, d, f);
  }
  return r;
}

HfModel import_qwen2_moe(const Keys& k, Source& src) {
  HfModel r;
  moe::ModelConfig& m = r.config;
  common_checks(k);
  if (k.boolean("use_sliding_window", false)) k.refuse("use_sliding_window", "sliding-window attention is not supported");
  if (k.integer("decoder_sparse_step", 1) != 1) k.refuse("decoder_sparse_step", "only 1 (every layer MoE) is supported");
  read_shape(k, m, 1e-6);
  m.attention_bias = k.boolean("qkv_bias", true);
  m.num_experts = k.integer("num_experts");
  m.moe_ffn_hidden_size = k.integer("moe_intermediate_size");
  m.ffn_hidden_size = k.integer("intermediate_size");
  const int64_t shared = k.integer("shared_expert_intermediate_size", 0);
  if (shared % m.moe_ffn_hidden_size != 0) {
    k.refuse("shared_expert_intermediate_size", "must be a multiple of moe_intermediate_size (FrugalMoE's shared expert is num_shared_experts of them)");
  }
  m.num_shared_experts = shared / m.moe_ffn_hidden_size;
  m.shared_expert_gate = m.num_shared_experts > 0;
  // Dense layers only as a prefix: mlp_only_layers [0, 1, .., k - 1].
  const std::vector<int64_t> dense = k.integers("mlp_only_layers");
  for (size_t i = 0; i < dense.size(); ++i) {
    if (dense[i] != static_cast<int64_t>(i)) k.refuse("mlp_only_layers", "dense layers must be the first ones (0, 1, ..)");
  }
  m.first_k_dense = static_cast<int64_t>(dense.size());
  plain_softmax_routing(k, m, k.boolean("norm_topk_prob", false));
  read_rope(k, m);
  if (const std::string error = m.validate(); !error.empty()) throw std::runtime_error("config.json: model." + error);
  const int64_t d = m.hidden_size, f = m.moe_ffn_hidden_size;
  TensorMap& t = r.tensors;
  import_ends(src, m, t);
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const std::string hf = "model.layers." + std::to_string(l) + ".", ours = "layers." + std::to_string(l) + ".";
    import_layer_norms(src, hf, ours, d, t);
    import_gqa(src, hf + "self_attn.", ours, m, t);
    if (!m.is_moe_layer(l)) {
      import_mlp(src, hf + "mlp", ours + "ffn", d, m.ffn_hidden_size, t);
      continue;
    }
    t[ours + "moe.router_weight"] = src.take(hf + "mlp.gate.weight", {m.num_experts, d});
    t[ours + "moe.expert_bias"] = at::zeros({m.num_experts});
    t[ours + "moe.w13"] = experts_w13(src, hf + "mlp.experts.", "gate_proj", "up_proj", m.num_experts, d, f);
    t[ours + "moe.w2"] = experts_w2(src, hf + "mlp.experts.", "down_proj", m.num_experts, d, f);
    if (m.num_shared_experts > 0) {
      import_mlp(src, hf + "mlp.shared_expert", ours + "moe.shared", d, shared, t);
      t[ours + "moe.shared_gate"] = src.take(hf + "mlp.shared_expert_gate.weight", {1, d});
    }
  }
  return r;
}

}  // namespace

HfModel import_hf(const std::string& dir) {
  const std::string path = dir + "/config.json";
  const Keys k(read_json(path), path);
  const std::string type = k.text("model_type", "");
  if (type != "deepseek_v3" && type != "deepseek_v2" && type != "mixtral" && type != "qwen2_moe") {
    k.refuse("model_type", "'" + type + "' is not supported (deepseek_v3, deepseek_v2, mixtral, qwen2_moe)");
  }
  Source src(dir);
  HfModel r = type == "mixtral"     ? import_mixtral(k, src)
              : type == "qwen2_moe" ? import_qwen2_moe(k, src)
                                    : import_deepseek(k, src, /*v2=*/type == "deepseek_v2");
  r.model_type = type;
  src.check_all_taken();
  return r;
}

std::string hf_model_type(const moe::ModelConfig& m) {
  const auto refuse = [](const std::string& key, const std::string& why) {
    return std::runtime_error("model." + key + ": " + why + " (exports: DeepseekV3, DeepseekV2, Mixtral, Qwen2-MoE)");
  };
  if (m.num_moe_layers() == 0) throw refuse("first_k_dense", "the model has no MoE layer");
  if (m.is_mla()) {
    if (m.score_function == moe::ScoreFunction::kSigmoid) return "deepseek_v3";
    if (m.norm_topk_prob) throw refuse("norm_topk_prob", "DeepseekV2 (softmax routing) never renormalises its top-k weights");
    return "deepseek_v2";
  }
  if (m.score_function != moe::ScoreFunction::kSoftmax || m.num_groups != 1 || m.route_scale != 1.0) {
    throw refuse("score_function", "Mixtral and Qwen2-MoE route by softmax over all experts, unscaled");
  }
  if (m.rope_scaling.yarn()) throw refuse("rope_scaling", "Mixtral and Qwen2-MoE have no rope scaling");
  if (m.num_shared_experts > 0 || m.attention_bias) {
    if (m.num_shared_experts > 0 && !m.shared_expert_gate) throw refuse("shared_expert_gate", "Qwen2-MoE gates its shared expert");
    return "qwen2_moe";
  }
  if (m.first_k_dense > 0) throw refuse("first_k_dense", "every Mixtral layer is MoE");
  if (!m.norm_topk_prob) throw refuse("norm_topk_prob", "Mixtral renormalises its top-k weights");
  return "mixtral";
}

// Kept whole (~150 lines): one walk over the model that names every tensor the
// Hugging Face way, with the four architectures' differences side by side.
void export_hf(const moe::ModelConfig& m, const TensorMap& tensors, const std::string& dir, int64_t shard_bytes) {
  const std::string type = hf_model_type(m);
  const bool deepseek = type == "deepseek_v3" || type == "deepseek_v2", mixtral = type == "mixtral", qwen = type == "qwen2_moe";
  const auto get = [&](const std::string& name) {
    const auto it = tensors.find(name);
    if (it == tensors.end()) throw std::runtime_error("checkpoint: tensor '" + name + "' is missing");
    return it->second.to(at::kFloat).contiguous();
  };
  const int64_t d = m.hidden_size, f = m.moe_ffn_hidden_size;
  std::vector<std::pair<std::string, at::Tensor>> out;  // in order
  const auto put = [&](const std::string& name, const at::Tensor& t) { out.emplace_back(name, t.contiguous()); };
  put("model.embed_tokens.weight", get("embedding.weight"));
  const auto mlp = [&](const std::string& ours, const std::string& hf) {
    const at::Tensor w13 = get(ours + ".w13")[0], w2 = get(ours + ".w2")[0];
    const int64_t width = w2.size(0);
    put(hf + ".gate_proj.weight", w13.narrow(1, 0, width).t());
    put(hf + ".up_proj.weight", w13.narrow(1, width, width).t());
    put(hf + ".down_proj.weight", w2.t());
  };
  const int64_t rope = m.qk_rope_head_dim, qk = m.qk_head_dim();
  for (int64_t l = 0; l < m.num_layers; ++l) {
    const std::string hf = "model.layers." + std::to_string(l) + ".", ours = "layers." + std::to_string(l) + ".";
    put(hf + "input_layernorm.weight", get(ours + "attention_norm.weight"));
    put(hf + "post_attention_layernorm.weight", get(ours + "ffn_norm.weight"));
    const std::string a = hf + "self_attn.";
    if (deepseek) {
      if (m.q_lora_rank > 0) {
        put(a + "q_a_proj.weight", get(ours + "attention.wq_a"));
        put(a + "q_a_layernorm.weight", get(ours + "attention.q_a_norm.weight"));
        put(a + "q_b_proj.weight", permute_rope_rows(get(ours + "attention.wq_b"), qk, m.qk_nope_head_dim, rope, /*inverse=*/true));
      } else {
        put(a + "q_proj.weight", permute_rope_rows(get(ours + "attention.wq"), qk, m.qk_nope_head_dim, rope, true));
      }
      put(a + "kv_a_proj_with_mqa.weight", permute_rope_rows(get(ours + "attention.wkv_a"), m.kv_lora_rank + rope, m.kv_lora_rank, rope, true));
      put(a + "kv_a_layernorm.weight", get(ours + "attention.kv_a_norm.weight"));
      put(a + "kv_b_proj.weight", get(ours + "attention.wkv_b"));
    } else {
      const int64_t q_rows = m.num_heads * m.head_dim, kv_rows = m.num_kv_heads * m.head_dim;
      const auto split = [&](const at::Tensor& t, const char* suffix) {
        put(a + "q_proj." + suffix, t.narrow(0, 0, q_rows));
        put(a + "k_proj." + suffix, t.narrow(0, q_rows, kv_rows));
        put(a + "v_proj." + suffix, t.narrow(0, q_rows + kv_rows, kv_rows));
      };
      split(get(ours + "attention.wqkv"), "weight");
      if (m.attention_bias) split(get(ours + "attention.bqkv"), "bias");
    }
    put(a + "o_proj.weight", get(ours + "attention.wo"));
    if (!m.is_moe_layer(l)) {
      mlp(ours + "ffn", hf + "mlp");
      continue;
    }
    const at::Tensor w13 = get(ours + "moe.w13"), w2 = get(ours + "moe.w2"), bias = get(ours + "moe.expert_bias");
    if (type != "deepseek_v3" && bias.abs().max().item<double>() > 0) {
      throw std::runtime_error("checkpoint: tensor '" + ours + "moe.expert_bias' is not zero, and " + type +
                               " has no correction bias (train with model.expert_bias_update_rate: 0)");
    }
    const std::string moe = hf + (mixtral ? "block_sparse_moe." : "mlp.");
    put(moe + "gate.weight", get(ours + "moe.router_weight"));
    if (type == "deepseek_v3") put(moe + "gate.e_score_correction_bias", bias);
    for (int64_t e = 0; e < m.num_experts; ++e) {
      const std::string p = moe + "experts." + std::to_string(e) + ".";
      put(p + (mixtral ? "w1" : "gate_proj") + ".weight", w13[e].narrow(1, 0, f).t());
      put(p + (mixtral ? "w3" : "up_proj") + ".weight", w13[e].narrow(1, f, f).t());
      put(p + (mixtral ? "w2" : "down_proj") + ".weight", w2[e].t());
    }
    if (m.num_shared_experts > 0) mlp(ours + "moe.shared", moe + (qwen ? "shared_expert" : "shared_experts"));
    if (qwen && m.num_shared_experts > 0) put(moe + "shared_expert_gate.weight", get(ours + "moe.shared_gate"));
  }
  put("model.norm.weight", get("head.norm.weight"));
  put("lm_head.weight", get("head.weight"));

  json c = {{"model_type", type}, {"vocab_size", m.vocab_size}, {"hidden_size", d}, {"num_hidden_layers", m.num_layers},
            {"num_attention_heads", m.num_heads}, {"max_position_embeddings", m.max_seq_len}, {"rms_norm_eps", m.norm_eps},
            {"num_experts_per_tok", m.top_k}, {"hidden_act", "silu"}, {"tie_word_embeddings", false}, {"attention_bias", false},
            {"torch_dtype", "float32"}, {"initializer_range", m.init_std}};
  json rope_json = {{"rope_theta", m.rope_theta}, {"rope_type", m.rope_scaling.yarn() ? "yarn" : "default"}};
  if (m.rope_scaling.yarn()) {
    rope_json["factor"] = m.rope_scaling.factor;
    rope_json["original_max_position_embeddings"] = m.rope_scaling.original_max_position_embeddings;
    rope_json["beta_fast"] = m.rope_scaling.beta_fast;
    rope_json["beta_slow"] = m.rope_scaling.beta_slow;
    rope_json["mscale"] = m.rope_scaling.mscale;
    rope_json["mscale_all_dim"] = m.rope_scaling.mscale_all_dim;
  }
  c["rope_parameters"] = rope_json;
  c["rope_theta"] = m.rope_theta;
  if (m.rope_scaling.yarn()) {  // the older spelling, for tools that read rope_scaling
    json old = rope_json;
    old.erase("rope_theta");
    old["type"] = "yarn";
    c["rope_scaling"] = old;
  }
  if (deepseek) {
    const bool v3 = type == "deepseek_v3";
    c["architectures"] = {v3 ? "DeepseekV3ForCausalLM" : "DeepseekV2ForCausalLM"};
    c.update({{"num_key_value_heads", m.num_heads}, {"intermediate_size", m.ffn_hidden_size}, {"moe_intermediate_size", f},
              {"n_routed_experts", m.num_experts}, {"n_shared_experts", m.num_shared_experts}, {"first_k_dense_replace", m.first_k_dense},
              {"n_group", m.num_groups}, {"topk_group", m.group_top_k}, {"norm_topk_prob", m.norm_topk_prob},
              {"routed_scaling_factor", m.route_scale}, {"q_lora_rank", m.q_lora_rank > 0 ? json(m.q_lora_rank) : json(nullptr)},
              {"kv_lora_rank", m.kv_lora_rank}, {"qk_nope_head_dim", m.qk_nope_head_dim}, {"qk_rope_head_dim", m.qk_rope_head_dim},
              {"v_head_dim", m.v_head_dim}, {"head_dim", m.qk_rope_head_dim}});
    if (v3) {
      c.update({{"scoring_func", "sigmoid"}, {"topk_method", "noaux_tc"}, {"rope_interleave", true}, {"num_nextn_predict_layers", 0}});
    } else {
      c.update({{"scoring_func", "softmax"}, {"topk_method", m.num_groups > 1 ? "group_limited_greedy" : "greedy"},
                {"aux_loss_alpha", m.aux_loss_coeff}, {"mlp_bias", false}});
    }
  } else if (mixtral) {
    c["architectures"] = {"MixtralForCausalLM"};
    c.update({{"num_key_value_heads", m.num_kv_heads}, {"head_dim", m.head_dim}, {"intermediate_size", f},
              {"num_local_experts", m.num_experts}, {"router_aux_loss_coef", m.aux_loss_coeff}, {"sliding_window", nullptr}});
  } else {
    c["architectures"] = {"Qwen2MoeForCausalLM"};
    std::vector<int64_t> dense(static_cast<size_t>(m.first_k_dense));
    for (size_t i = 0; i < dense.size(); ++i) dense[i] = static_cast<int64_t>(i);
    c.update({{"num_key_value_heads", m.num_kv_heads}, {"head_dim", m.head_dim}, {"intermediate_size", m.ffn_hidden_size},
              {"moe_intermediate_size", f}, {"shared_expert_intermediate_size", f * m.num_shared_experts}, {"num_experts", m.num_experts},
              {"norm_topk_prob", m.norm_topk_prob}, {"qkv_bias", m.attention_bias}, {"decoder_sparse_step", 1}, {"mlp_only_layers", dense},
              {"use_sliding_window", false}, {"router_aux_loss_coef", m.aux_loss_coeff}});
  }
  std::filesystem::create_directories(dir);
  common::write_file_atomic(dir + "/config.json", c.dump(2) + "\n");

  // Shards in order, each closed once it passes shard_bytes.
  std::vector<TensorMap> shards(1);
  int64_t bytes = 0, total = 0;
  for (const auto& [name, t] : out) {
    const int64_t size = t.numel() * 4;
    if (bytes > 0 && bytes + size > shard_bytes) shards.emplace_back(), bytes = 0;
    shards.back()[name] = t;
    bytes += size;
    total += size;
  }
  const std::map<std::string, std::string> metadata = {{"format", "pt"}};
  if (shards.size() == 1) {
    write_safetensors(dir + "/model.safetensors", shards[0], metadata);
    return;
  }
  json weight_map = json::object();
  char name[64];
  for (size_t i = 0; i < shards.size(); ++i) {
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", i + 1, shards.size());
    write_safetensors(dir + "/" + name, shards[i], metadata);
    for (const auto& [tensor, value] : shards[i]) weight_map[tensor] = name;
  }
  common::write_file_atomic(dir + "/model.safetensors.index.json",
                          json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2) + "\n");
}

}  // namespace fmoe::checkpoint
