#include "config/config.h"

#include "moe/stage_split.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <fstream>
#include <sstream>

namespace fmoe::config {
namespace {

// One description of every field, walked by the reader and the writer alike.
template <class V>
void visit(V& v, moe::RopeScaling& c) {
  v.field("type", c.type);
  v.field("factor", c.factor);
  v.field("original_max_position_embeddings", c.original_max_position_embeddings);
  v.field("beta_fast", c.beta_fast);
  v.field("beta_slow", c.beta_slow);
  v.field("mscale", c.mscale);
  v.field("mscale_all_dim", c.mscale_all_dim);
}

template <class V>
void visit(V& v, moe::ModelConfig& c) {
  v.field("vocab_size", c.vocab_size);
  v.field("hidden_size", c.hidden_size);
  v.field("num_layers", c.num_layers);
  v.field("num_heads", c.num_heads);
  v.field("num_kv_heads", c.num_kv_heads);
  v.field("head_dim", c.head_dim);
  v.field("ffn_hidden_size", c.ffn_hidden_size);
  v.field("first_k_dense", c.first_k_dense);
  v.field("max_seq_len", c.max_seq_len);
  v.field("rope_theta", c.rope_theta);
  v.section("rope_scaling", c.rope_scaling);
  v.field("norm_eps", c.norm_eps);
  v.field("init_std", c.init_std);
  v.field("num_experts", c.num_experts);
  v.field("top_k", c.top_k);
  v.field("moe_ffn_hidden_size", c.moe_ffn_hidden_size);
  v.field("num_shared_experts", c.num_shared_experts);
  v.field("score_function", c.score_function);
  v.field("num_groups", c.num_groups);
  v.field("group_top_k", c.group_top_k);
  v.field("norm_topk_prob", c.norm_topk_prob);
  v.field("route_scale", c.route_scale);
  v.field("expert_bias_update_rate", c.expert_bias_update_rate);
  v.field("aux_loss_coeff", c.aux_loss_coeff);
  v.field("capacity_factor", c.capacity_factor);
  v.field("z_loss_coeff", c.z_loss_coeff);
  v.field("attention", c.attention);
  v.field("q_lora_rank", c.q_lora_rank);
  v.field("kv_lora_rank", c.kv_lora_rank);
  v.field("qk_nope_head_dim", c.qk_nope_head_dim);
  v.field("qk_rope_head_dim", c.qk_rope_head_dim);
  v.field("v_head_dim", c.v_head_dim);
  v.field("mtp_depth", c.mtp_depth);
  v.field("mtp_loss_weight", c.mtp_loss_weight);
  v.field("attention_bias", c.attention_bias);
  v.field("shared_expert_gate", c.shared_expert_gate);
}

template <class V>
void visit(V& v, DataConfig& c) {
  v.field("prefix", c.prefix);
  v.field("tokenizer", c.tokenizer);
  v.field("sources", c.sources);
  v.field("tokenizer_training_documents", c.tokenizer_training_documents);
  v.field("val_fraction", c.val_fraction);
  v.field("split_seed", c.split_seed);
}

template <class V>
void visit(V& v, OptimizerConfig& c) {
  v.field("name", c.name);
  v.field("lr", c.lr);
  v.field("min_lr", c.min_lr);
  v.field("beta1", c.beta1);
  v.field("beta2", c.beta2);
  v.field("eps", c.eps);
  v.field("weight_decay", c.weight_decay);
  v.field("decay_norms", c.decay_norms);
  v.field("decay_embedding", c.decay_embedding);
  v.field("decay_router", c.decay_router);
  v.field("grad_clip", c.grad_clip);
  v.field("lr_schedule", c.lr_schedule);
  v.field("warmup_steps", c.warmup_steps);
  v.field("wsd_decay_fraction", c.wsd_decay_fraction);
  v.field("main_params_dtype", c.main_params_dtype);
  v.field("stochastic_rounding", c.stochastic_rounding);
  v.field("grad_stochastic_rounding", c.grad_stochastic_rounding);
  v.field("grad_hadamard", c.grad_hadamard);
  v.field("exp_avg_dtype", c.exp_avg_dtype);
  v.field("exp_avg_sq_dtype", c.exp_avg_sq_dtype);
  v.field("exp_avg_sq_stochastic_rounding", c.exp_avg_sq_stochastic_rounding);
  v.field("grad_dtype", c.grad_dtype);
  v.field("state_block_size", c.state_block_size);
  v.field("adamw_lr", c.adamw_lr);
  v.field("muon_momentum", c.muon_momentum);
  v.field("muon_nesterov", c.muon_nesterov);
  v.field("muon_ns_steps", c.muon_ns_steps);
  v.field("muon_scale", c.muon_scale);
  v.field("qk_clip_threshold", c.qk_clip_threshold);
}

template <class V>
void visit(V& v, PrecisionConfig& c) {
  v.field("fp8", c.fp8);
  v.field("tf32", c.tf32);
}

template <class V>
void visit(V& v, TrainingConfig& c) {
  v.field("steps", c.steps);
  v.field("seq_len", c.seq_len);
  v.field("micro_batch_size", c.micro_batch_size);
  v.field("grad_accum_steps", c.grad_accum_steps);
  v.field("seed", c.seed);
  v.field("precision", c.precision);
  v.field("threads", c.threads);
  v.field("device", c.device);
  v.field("deterministic", c.deterministic);
  v.field("log_interval", c.log_interval);
  v.field("eval_interval", c.eval_interval);
  v.field("eval_sequences", c.eval_sequences);
  v.field("checkpoint_interval", c.checkpoint_interval);
  v.field("checkpoint_at_end", c.checkpoint_at_end);
  v.field("keep_checkpoints", c.keep_checkpoints);
  v.field("keep_every", c.keep_every);
  v.field("async_checkpoint", c.async_checkpoint);
  v.field("run_dir", c.run_dir);
  v.field("init_from", c.init_from);
  v.field("recompute", c.recompute);
}

template <class V>
void visit(V& v, ParallelConfig& c) {
  v.field("dp", c.dp);
  v.field("tp", c.tp);
  v.field("pp", c.pp);
  v.field("ep", c.ep);
  v.field("virtual_pp", c.virtual_pp);
  v.field("zero1", c.zero1);
  v.field("expert_dispatcher", c.expert_dispatcher);
  v.field("sequence_parallel", c.sequence_parallel);
  v.field("timeout_s", c.timeout_s);
  v.field("bucket_mb", c.bucket_mb);
  v.field("mpi_progress_thread", c.mpi_progress_thread);
  v.field("ep_overlap", c.ep_overlap);
  v.field("fb_overlap", c.fb_overlap);
  v.field("backend", c.backend);
  v.field("pipeline_schedule", c.pipeline_schedule);
  v.field("pipeline_layout", c.pipeline_layout);
}

template <class V>
void visit(V& v, BudgetConfig& c) {
  v.field("usd_per_gpu_hour", c.usd_per_gpu_hour);
  v.field("max_usd", c.max_usd);
  v.field("max_gpu_hours", c.max_gpu_hours);
  v.field("max_tokens", c.max_tokens);
  v.field("max_minutes", c.max_minutes);
  v.field("calibration_steps", c.calibration_steps);
}

template <class V>
void visit(V& v, Config& c) {
  v.section("model", c.model);
  v.section("data", c.data);
  v.section("optimizer", c.optimizer);
  v.section("training", c.training);
  v.section("parallel", c.parallel);
  v.section("precision", c.precision);
  v.section("budget", c.budget);
}

std::string location(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null() || mark.line < 0) return "--set";
  return source + ":" + std::to_string(mark.line + 1) + ":" + std::to_string(mark.column + 1);
}

class Reader {
 public:
  Reader(YAML::Node node, std::string source, std::string prefix)
      : node_(std::move(node)), source_(std::move(source)), prefix_(std::move(prefix)) {}

  template <class T>
  void field(const char* key, T& value) {
    known_.emplace_back(key);
    const YAML::Node child = node_[key];
    if (!child) return;
    parse(child, prefix_ + key, value);
  }

  template <class S>
  void section(const char* key, S& value) {
    known_.emplace_back(key);
    const YAML::Node child = node_[key];
    if (!child || child.IsNull()) return;
    if (!child.IsMap()) fail(child, prefix_ + key, "expected a mapping of keys");
    Reader reader(child, source_, prefix_ + key + ".");
    visit(reader, value);
    reader.reject_unknown_keys();
  }

  void reject_unknown_keys() const {
    for (const auto& entry : node_) {
      const std::string key = entry.first.as<std::string>();
      if (std::find(known_.begin(), known_.end(), key) != known_.end()) continue;
      const auto nearest = std::min_element(known_.begin(), known_.end(), [&](const auto& a, const auto& b) {
        return edit_distance(key, a) < edit_distance(key, b);
      });
      std::string message = location(source_, entry.first.Mark()) + ": unknown key '" + prefix_ + key + "'";
      if (prefix_ + key == "training.eval_batches") {
        message += "; validation is now a fixed number of held-out windows: use 'training.eval_sequences'";
      } else if (nearest != known_.end()) message += "; did you mean '" + prefix_ + *nearest + "'?";
      throw ConfigError(message);
    }
  }

 private:
  [[noreturn]] void fail(const YAML::Node& node, const std::string& key, const std::string& why) const {
    throw ConfigError(location(source_, node.Mark()) + ": " + key + ": " + why);
  }

  std::string scalar(const YAML::Node& node, const std::string& key, const char* expected) const {
    if (!node.IsScalar()) fail(node, key, std::string("expected ") + expected);
    return node.Scalar();
  }

  void parse(const YAML::Node& node, const std::string& key, int64_t& out) const {
    const std::string text = scalar(node, key, "an integer");
    const auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), out);
    if (ec != std::errc() || end != text.data() + text.size()) fail(node, key, "expected an integer, got '" + text + "'");
  }

  void parse(const YAML::Node& node, const std::string& key, double& out) const {
    const std::string text = scalar(node, key, "a number");
    char* end = nullptr;
    out = std::strtod(text.c_str(), &end);
    if (text.empty() || end != text.c_str() + text.size()) fail(node, key, "expected a number, got '" + text + "'");
  }

  void parse(const YAML::Node& node, const std::string& key, bool& out) const {
    const std::string text = scalar(node, key, "true or false");
    if (text == "true" || text == "True") {
      out = true;
    } else if (text == "false" || text == "False") {
      out = false;
    } else {
      fail(node, key, "expected true or false, got '" + text + "'");
    }
  }

  void parse(const YAML::Node& node, const std::string& key, std::string& out) const {
    out = scalar(node, key, "a string");
  }

  void parse(const YAML::Node& node, const std::string& key, std::vector<std::string>& out) const {
    if (!node.IsSequence()) fail(node, key, "expected a list of strings");
    out.clear();
    for (const auto& item : node) out.push_back(scalar(item, key, "a string"));
  }

  void parse(const YAML::Node& node, const std::string& key, moe::ScoreFunction& out) const {
    const std::string text = scalar(node, key, "softmax or sigmoid");
    if (text == "softmax") {
      out = moe::ScoreFunction::kSoftmax;
    } else if (text == "sigmoid") {
      out = moe::ScoreFunction::kSigmoid;
    } else {
      fail(node, key, "expected softmax or sigmoid, got '" + text + "'");
    }
  }

  YAML::Node node_;
  std::string source_;
  std::string prefix_;
  std::vector<std::string> known_;
};

class Writer {
 public:
  explicit Writer(YAML::Emitter& out) : out_(out) {}
  template <class T>
  void field(const char* key, const T& value) {
    out_ << YAML::Key << key << YAML::Value << value;
  }
  void field(const char* key, const double& value) {
    std::ostringstream text;
    text.precision(17);
    text << value;
    std::string s = text.str();
    // Keep numbers recognisable as floats when read back.
    if (s.find_first_of(".eEn") == std::string::npos) s += ".0";
    out_ << YAML::Key << key << YAML::Value << s;
  }
  void field(const char* key, const moe::ScoreFunction& value) {
    out_ << YAML::Key << key << YAML::Value << (value == moe::ScoreFunction::kSoftmax ? "softmax" : "sigmoid");
  }
  void field(const char* key, const std::vector<std::string>& value) {
    out_ << YAML::Key << key << YAML::Value << YAML::Flow << YAML::BeginSeq;
    for (const auto& item : value) out_ << item;
    out_ << YAML::EndSeq;
  }
  template <class S>
  void section(const char* key, S& value) {
    out_ << YAML::Key << key << YAML::Value << YAML::BeginMap;
    visit(*this, value);
    out_ << YAML::EndMap;
  }

 private:
  YAML::Emitter& out_;
};

void apply_override(YAML::Node& root, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0) throw ConfigError("--set " + assignment + ": expected key.path=value");
  const std::string path = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);
  std::vector<std::string> keys;
  std::stringstream parts(path);
  for (std::string part; std::getline(parts, part, '.');) keys.push_back(part);
  // yaml-cpp's operator[] returns proxies; walk with reset to descend by value.
  std::vector<YAML::Node> chain{root};
  for (size_t i = 0; i + 1 < keys.size(); ++i) {
    YAML::Node next = chain.back()[keys[i]];
    if (!next.IsDefined() || next.IsNull()) {
      chain.back()[keys[i]] = YAML::Node(YAML::NodeType::Map);
      next = chain.back()[keys[i]];
    } else if (!next.IsMap()) {
      throw ConfigError("--set " + assignment + ": '" + keys[i] + "' is not a section");
    }
    chain.push_back(next);
  }
  YAML::Node parsed;
  try {
    parsed = YAML::Load(value);
  } catch (const YAML::Exception&) {
    parsed = YAML::Node(value);
  }
  // A fresh node carries no file position, so errors about it read "--set".
  YAML::Node fresh = parsed.IsScalar() ? YAML::Node(parsed.Scalar()) : YAML::Clone(parsed);
  chain.back()[keys.back()] = fresh;
}

std::string check(const std::string& section, const std::string& error) {
  return error.empty() ? error : section + "." + error;
}

}  // namespace

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

std::string DataConfig::validate() const {
  if (prefix.empty()) return "prefix: must not be empty";
  if (tokenizer.empty()) return "tokenizer: must not be empty";
  if (!(val_fraction >= 0 && val_fraction < 1)) return "val_fraction: must be in [0, 1)";
  if (tokenizer_training_documents < 0) return "tokenizer_training_documents: must be >= 0";
  return "";
}

std::string OptimizerConfig::validate() const {
  if (!(lr > 0)) return "lr: must be > 0";
  if (!(min_lr >= 0 && min_lr <= lr)) return "min_lr: must be in [0, lr]";
  if (!(beta1 >= 0 && beta1 < 1)) return "beta1: must be in [0, 1)";
  if (!(beta2 >= 0 && beta2 < 1)) return "beta2: must be in [0, 1)";
  if (!(eps > 0)) return "eps: must be > 0";
  if (!(weight_decay >= 0)) return "weight_decay: must be >= 0";
  if (!(grad_clip >= 0)) return "grad_clip: must be >= 0";
  if (lr_schedule != "cosine" && lr_schedule != "wsd" && lr_schedule != "constant") {
    return "lr_schedule: must be cosine, wsd or constant, got '" + lr_schedule + "'";
  }
  if (warmup_steps < 0) return "warmup_steps: must be >= 0";
  if (!(wsd_decay_fraction >= 0 && wsd_decay_fraction <= 1)) return "wsd_decay_fraction: must be in [0, 1]";
  const auto one_of = [](const std::string& value, std::initializer_list<const char*> allowed) {
    for (const char* a : allowed) {
      if (value == a) return true;
    }
    return false;
  };
  if (!one_of(main_params_dtype, {"fp32", "bf16", "fp16"})) return "main_params_dtype: must be fp32, bf16 or fp16, got '" + main_params_dtype + "'";
  if (!one_of(exp_avg_dtype, {"fp32", "bf16", "fp8", "fp6"})) return "exp_avg_dtype: must be fp32, bf16, fp8 or fp6, got '" + exp_avg_dtype + "'";
  if (!one_of(exp_avg_sq_dtype, {"fp32", "bf16", "fp16", "fp8"})) {
    return "exp_avg_sq_dtype: must be fp32, bf16, fp16 or fp8, got '" + exp_avg_sq_dtype + "'";
  }
  if (!one_of(grad_dtype, {"fp32", "bf16", "fp8", "fp6", "fp4", "nvfp4"})) {
    return "grad_dtype: must be fp32, bf16, fp8, fp6, fp4 or nvfp4, got '" + grad_dtype + "'";
  }
  if (state_block_size < 1) return "state_block_size: must be >= 1";
  if (stochastic_rounding && main_params_dtype != "bf16") {
    return "stochastic_rounding: rounds BF16 master weights; main_params_dtype is '" + main_params_dtype + "'";
  }
  if (exp_avg_sq_stochastic_rounding && exp_avg_sq_dtype != "fp8") {
    return "exp_avg_sq_stochastic_rounding: rounds fp8 second moments; exp_avg_sq_dtype is '" + exp_avg_sq_dtype + "'";
  }
  if (name != "adamw" && name != "muon") return "name: must be adamw or muon, got '" + name + "'";
  const bool fp4_grads = grad_dtype == "fp4" || grad_dtype == "nvfp4";
  if (!grad_stochastic_rounding && !fp4_grads) {
    return "grad_stochastic_rounding: rounds fp4 and nvfp4 gradients; grad_dtype is '" + grad_dtype + "'";
  }
  if (grad_hadamard && !fp4_grads) {
    return "grad_hadamard: rotates fp4 and nvfp4 gradients; grad_dtype is '" + grad_dtype + "'";
  }
  if (fp4_grads && name != "muon") {
    return "grad_dtype: " + grad_dtype + " is for Muon's matrices (name: muon); AdamW's second moment would take its rounding noise for signal";
  }
  if (!(adamw_lr >= 0)) return "adamw_lr: must be >= 0 (0: lr)";
  if (!(muon_momentum >= 0 && muon_momentum < 1)) return "muon_momentum: must be in [0, 1)";
  if (muon_ns_steps < 1 || muon_ns_steps > 20) return "muon_ns_steps: must be in [1, 20], got " + std::to_string(muon_ns_steps);
  if (!(qk_clip_threshold >= 0)) return "qk_clip_threshold: must be >= 0 (0: off)";
  if (muon_scale != "rms" && muon_scale != "shape") return "muon_scale: must be rms or shape, got '" + muon_scale + "'";
  return "";
}

std::string TrainingConfig::validate() const {
  if (steps < 0) return "steps: must be >= 1, or 0 to size the run by the budget, got " + std::to_string(steps);
  if (seq_len < 1) return "seq_len: must be >= 1";
  if (micro_batch_size < 1) return "micro_batch_size: must be >= 1";
  if (grad_accum_steps < 1) return "grad_accum_steps: must be >= 1";
  if (precision != "auto" && precision != "bf16" && precision != "fp32") {
    return "precision: must be auto, bf16 or fp32, got '" + precision + "'";
  }
  if (threads < 0) return "threads: must be >= 0";
  if (device != "auto" && device != "cpu" && device != "cuda") return "device: must be auto, cpu or cuda, got '" + device + "'";
  if (log_interval < 1) return "log_interval: must be >= 1";
  if (eval_interval < 0) return "eval_interval: must be >= 0";
  if (eval_sequences < 1) return "eval_sequences: must be >= 1";
  if (checkpoint_interval < 0) return "checkpoint_interval: must be >= 0";
  if (keep_checkpoints < 1) return "keep_checkpoints: must be >= 1";
  if (keep_every < 0) return "keep_every: must be >= 0 (0: none kept for good)";
  if (run_dir.empty()) return "run_dir: must not be empty";
  if (recompute != "none" && recompute != "selective" && recompute != "full") {
    return "recompute: must be none, selective or full, got '" + recompute + "'";
  }
  return "";
}

std::string ParallelConfig::validate() const {
  if (dp < 0) return "dp: must be >= 0 (0 means the world size)";
  for (auto [name, value] : {std::pair{"tp", tp}, {"pp", pp}, {"ep", ep}, {"virtual_pp", virtual_pp}}) {
    if (value < 1) return std::string(name) + ": must be >= 1, got " + std::to_string(value);
  }
  if (dp > 0 && dp % ep != 0) return "ep: must divide dp (" + std::to_string(dp) + "), got " + std::to_string(ep);
  if (expert_dispatcher != "alltoall" && expert_dispatcher != "allgather") {
    return "expert_dispatcher: must be alltoall or allgather, got '" + expert_dispatcher + "'";
  }
  if (ep_overlap && expert_dispatcher != "alltoall") {
    return "ep_overlap: overlaps the all-to-all dispatcher's exchanges; expert_dispatcher is '" + expert_dispatcher + "'";
  }
  if (fb_overlap && pipeline_schedule != "dualpipev") {
    return "fb_overlap: overlaps DualPipeV's F&B pairs; pipeline_schedule is '" + pipeline_schedule + "'";
  }
  if (!(timeout_s > 0)) return "timeout_s: must be > 0";
  if (!(bucket_mb > 0)) return "bucket_mb: must be > 0";
  if (backend != "auto" && backend != "nccl" && backend != "mpi") return "backend: must be auto, nccl or mpi, got '" + backend + "'";
  if (pipeline_schedule != "auto" && pipeline_schedule != "gpipe" && pipeline_schedule != "1f1b" && pipeline_schedule != "interleaved" &&
      pipeline_schedule != "zbh1" && pipeline_schedule != "dualpipev") {
    return "pipeline_schedule: must be auto, gpipe, 1f1b, interleaved, zbh1 or dualpipev, got '" + pipeline_schedule + "'";
  }
  return "";
}

std::string ParallelConfig::trainer_support() const {
  if (pp == 1 && virtual_pp != 1) return "virtual_pp: chunks per rank need pipeline parallelism (pp > 1)";
  if (pipeline_schedule == "dualpipev" && virtual_pp != 2) {
    return "pipeline_schedule: dualpipev runs two chunks per rank in a V (set virtual_pp: 2), got virtual_pp " + std::to_string(virtual_pp);
  }
  return "";
}

std::string BudgetConfig::validate() const {
  for (auto [name, value] : {std::pair{"usd_per_gpu_hour", usd_per_gpu_hour}, {"max_usd", max_usd}, {"max_gpu_hours", max_gpu_hours}}) {
    if (!(value >= 0)) return std::string(name) + ": must be >= 0";
  }
  if (max_tokens < 0) return "max_tokens: must be >= 0";
  if (!(max_minutes >= 0)) return "max_minutes: must be >= 0";
  if (calibration_steps < 3) return "calibration_steps: must be >= 3 (the first two steps warm caches up and are not timed)";
  if (max_usd > 0 && usd_per_gpu_hour <= 0) return "max_usd: needs usd_per_gpu_hour > 0 to convert time into dollars";
  return "";
}

std::string Config::validate() const {
  for (const std::string& error :
       {check("model", model.validate()), check("data", data.validate()), check("optimizer", optimizer.validate()),
        check("training", training.validate()), check("parallel", parallel.validate()),
        check("precision", precision.validate()), check("budget", budget.validate())}) {
    if (!error.empty()) return error;
  }
  if (!parallel.pipeline_layout.empty()) {
    try {
      moe::parse_stage_layout(parallel.pipeline_layout, model, training.seq_len, parallel.pp * parallel.virtual_pp);
    } catch (const std::invalid_argument& e) {
      return std::string("parallel.pipeline_layout: ") + e.what();
    }
  }
  if (training.seq_len > model.max_seq_len) {
    return "training.seq_len: " + std::to_string(training.seq_len) + " exceeds model.max_seq_len " + std::to_string(model.max_seq_len);
  }
  if (training.steps == 0) {
    if (!budget.limited()) {
      return "training.steps: 0 sizes the run by the budget, but no budget limit is set (budget.max_minutes, max_gpu_hours, "
             "max_usd or max_tokens)";
    }
    // The learning rate of the steps run before the schedule is fixed must not depend on its length.
    if (budget.limited_in_time() && optimizer.warmup_steps < budget.calibration_steps) {
      return "optimizer.warmup_steps: " + std::to_string(optimizer.warmup_steps) + " is shorter than budget.calibration_steps " +
             std::to_string(budget.calibration_steps) + "; a budget-sized schedule is fixed during warmup";
    }
  } else if (optimizer.warmup_steps > training.steps) {
    return "optimizer.warmup_steps: exceeds training.steps";
  }
  return "";
}

Config parse_config(const std::string& yaml_text, const std::string& source, const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::ParserException& e) {
    throw ConfigError(location(source, e.mark) + ": YAML syntax error: " + e.msg);
  }
  if (root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  if (!root.IsMap()) throw ConfigError(source + ": expected a mapping at the top level");
  for (const auto& assignment : overrides) apply_override(root, assignment);
  Config config;
  Reader reader(root, source, "");
  visit(reader, config);
  reader.reject_unknown_keys();
  if (const std::string error = config.validate(); !error.empty()) throw ConfigError(source + ": " + error);
  return config;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  if (!in) throw ConfigError(path + ": cannot open config file");
  std::stringstream text;
  text << in.rdbuf();
  return parse_config(text.str(), path, overrides);
}

std::string to_yaml(const Config& config) {
  YAML::Emitter out;
  out << YAML::BeginMap;
  Writer writer(out);
  visit(writer, const_cast<Config&>(config));
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace fmoe::config
