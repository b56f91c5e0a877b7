#include "moe/model.h"

#include "common/test_hooks.h"
#include "moe/grouped_swiglu.h"

#include "moe/cross_entropy.h"
#include "moe/linear.h"
#include "parallel/autograd.h"

#include <ATen/ATen.h>
#include <torch/torch.h>
#include <torch/nn/modules/container/modulelist.h>

#include <stdexcept>

namespace fmoe::moe {

EmbeddingStage::EmbeddingStage(const ModelConfig& c) {
  weight = register_parameter("weight", at::empty({c.vocab_size, c.hidden_size}).normal_(0, c.init_std));
}

at::Tensor EmbeddingStage::forward(const at::Tensor& tokens_BT, const Parallelism& parallel) {
  return parallel::vocab_parallel_embedding(tokens_BT.reshape({-1}), weight, parallel.tp().rank() * weight.size(0), parallel.tp(),
                                            parallel.sp());
}

HeadStage::HeadStage(const ModelConfig& c) {
  norm = register_module("norm", std::make_shared<RMSNorm>(c.hidden_size, c.norm_eps));
  weight = register_parameter("weight", at::empty({c.vocab_size, c.hidden_size}).normal_(0, c.init_std));
}

at::Tensor HeadStage::forward(const at::Tensor& x, const at::Tensor& targets_BT, at::ScalarType compute_dtype,
                             const Parallelism& parallel) {
  return loss(norm->forward(x, compute_dtype), targets_BT, compute_dtype, parallel);
}

at::Tensor HeadStage::loss(const at::Tensor& normed, const at::Tensor& targets_BT, at::ScalarType compute_dtype,
                           const Parallelism& parallel) {
  parallel::Communicator& tp = parallel.tp();
  const at::Tensor h = parallel.sp() ? parallel::all_gather_along(normed, 0, tp, /*reduce_scatter_grad=*/true)
                                     : parallel::copy_to_group(normed, tp);
  const at::Tensor logits = deferrable_linear(h, weight.to(compute_dtype));
  if (tp.size() > 1) return parallel::vocab_parallel_cross_entropy(logits, targets_BT.reshape({-1}), tp.rank() * weight.size(0), tp);
  // The loss reduces in FP32 (a BF16 log-softmax would round it to ~3 digits),
  // chunk by chunk, without an FP32 copy of the logits.
  return chunked_cross_entropy(logits, targets_BT.reshape({-1}));
}

MTPModule::MTPModule(const ModelConfig& c, int64_t layer_index) {
  embed_norm = register_module("embed_norm", std::make_shared<RMSNorm>(c.hidden_size, c.norm_eps));
  hidden_norm = register_module("hidden_norm", std::make_shared<RMSNorm>(c.hidden_size, c.norm_eps));
  proj = register_parameter("proj", at::empty({c.hidden_size, 2 * c.hidden_size}).normal_(0, c.init_std));
  block = register_module("block", std::make_shared<TransformerLayer>(c, layer_index));
  norm = register_module("norm", std::make_shared<RMSNorm>(c.hidden_size, c.norm_eps));
}

namespace {

std::string check_divides(const ModelConfig& c, const parallel::MeshShape& s) {
  const auto divides = [](int64_t degree, int64_t size) { return size % degree == 0; };
  const std::vector<std::pair<const char*, int64_t>> tp_sizes = {
      {"num_heads", c.num_heads}, {"num_kv_heads", c.is_mla() ? c.num_heads : c.num_kv_heads}, {"vocab_size", c.vocab_size},
      {"ffn_hidden_size", c.ffn_hidden_size}, {"moe_ffn_hidden_size", c.moe_ffn_hidden_size}};
  for (const auto& [name, size] : tp_sizes) {
    if (!divides(s.tp, size)) return "parallel.tp: " + std::to_string(s.tp) + " does not divide model." + name + " " + std::to_string(size);
  }
  if (c.num_moe_layers() > 0 && !divides(s.ep, c.num_experts)) {
    return "parallel.ep: " + std::to_string(s.ep) + " does not divide model.num_experts " + std::to_string(c.num_experts);
  }
  return {};
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

MoEModel::MoEModel(const ModelConfig& config, Parallelism parallel) : config_(config), parallel_(std::move(parallel)) {
  if (const std::string error = config.validate(); !error.empty()) throw std::invalid_argument("model." + error);
  if (const std::string error = config.trainer_support(); !error.empty()) throw std::invalid_argument("model." + error);
  embedding = register_module("embedding", std::make_shared<EmbeddingStage>(config));
  // A ModuleList names parameters "layers.<i>.…", the names checkpoints use.
  auto list = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < config.num_layers; ++i) {
    layers.push_back(std::make_shared<TransformerLayer>(config, i));
    list->push_back(layers.back());
  }
  head = register_module("head", std::make_shared<HeadStage>(config));
  if (config.mtp_depth > 0) {
    if (parallel_.sp()) throw std::invalid_argument("model.mtp_depth: multi-token prediction under parallel.sequence_parallel is not supported yet");
    auto modules = register_module("mtp", torch::nn::ModuleList());
    for (int64_t k = 0; k < config.mtp_depth; ++k) {
      // Its block is built like a layer past the last one (MoE, as in DeepSeek-V3).
      mtp.push_back(std::make_shared<MTPModule>(config, config.num_layers + k));
      modules->push_back(mtp.back());
    }
  }
  std::tie(rope_cos_, rope_sin_) = rope_tables(config.max_seq_len, config.rope_dim(), config.rope_theta, config.rope_scaling);

  // Shard specs by parameter name, then each rank keeps its shard of the full draw.
  const int64_t hd = config.head_dim, f = config.moe_ffn_hidden_size;
  for (const auto& item : named_parameters()) {
    const std::string& name = item.key();
    parallel::ShardSpec spec;
    if (name == "embedding.weight" || name == "head.weight") {
      spec.tp_dim = 0;
    } else if (ends_with(name, "attention.wqkv")) {
      spec = {0, {config.num_heads * hd, config.num_kv_heads * hd, config.num_kv_heads * hd}, -1};
    } else if (ends_with(name, "attention.bqkv")) {
      spec = {0, {config.num_heads * hd, config.num_kv_heads * hd, config.num_kv_heads * hd}, -1};
    } else if (ends_with(name, "moe.shared_gate")) {
      spec.tp_partial_grad = parallel_.sp();  // each tp rank gates its own tokens under sequence parallelism
    } else if (ends_with(name, "attention.wo")) {
      spec.tp_dim = 1;
    } else if (ends_with(name, "attention.wq") || ends_with(name, "attention.wq_b") || ends_with(name, "attention.wkv_b")) {
      spec.tp_dim = 0;  // MLA's per-head projections: rows head by head
    } else if (ends_with(name, "attention.wq_a") || ends_with(name, "attention.wkv_a") || ends_with(name, "a_norm.weight")) {
      spec.tp_partial_grad = parallel_.mesh.shape().tp > 1;  // MLA's replicated latent projections
    } else if (ends_with(name, "moe.w13")) {
      spec = {2, {f, f}, 0};
    } else if (ends_with(name, "moe.w2")) {
      spec = {1, {}, 0};
    } else if (ends_with(name, ".w13")) {  // dense and shared-expert FFNs
      spec = {2, {item.value().size(2) / 2, item.value().size(2) / 2}, -1};
    } else if (ends_with(name, ".w2")) {
      spec.tp_dim = 1;
    } else if (ends_with(name, "norm.weight")) {
      spec.tp_partial_grad = parallel_.sp();
    }
    specs_[name] = spec;
  }
  const parallel::MeshShape& shape = parallel_.mesh.shape();
  if (shape.tp > 1 || shape.ep > 1 || shape.pp > 1) {
    if (const std::string error = check_divides(config, shape); !error.empty()) throw std::invalid_argument(error);
    torch::NoGradGuard no_grad;
    for (auto& item : named_parameters()) {
      item.value().set_data(parallel::local_shard(item.value(), specs_.at(item.key()), shape, parallel_.mesh.coords()));
    }
  }
}

ForwardContext MoEModel::make_context(int64_t batch, int64_t seq_len, c10::Device device, at::ScalarType compute_dtype, bool fp8) {
  ForwardContext ctx;
  ctx.compute_dtype = compute_dtype;
  // On the CPU, BF16 GEMMs go through oneDNN, which JIT-compiles a kernel per
  // shape: padded expert groups keep the set of shapes small; FP32 runs
  // unpadded. cuBLAS and the grouped kernel pick kernels without compiling, so
  // a GPU pads only FP8 experts, to 128 rows: the native block-scaled GEMM wants
  // every dimension, the tokens of a weight gradient included, in 128s.
  ctx.expert_pad_multiple = device.is_cpu() ? (compute_dtype == at::kBFloat16 && !fp8 ? 64 : 1) : (fp8 ? 128 : 1);
  ctx.grouped_mm = !fp8 && use_grouped_mm(device, compute_dtype, common::test_hooks().grouped_mm);
  if (rope_cos_.device() != device) {  // the tables follow the model to its device once
    rope_cos_ = rope_cos_.to(device);
    rope_sin_ = rope_sin_.to(device);
  }
  ctx.fp8 = fp8;
  ctx.batch = batch;
  ctx.seq_len = seq_len;
  ctx.rope_cos_TH = rope_cos_.narrow(0, 0, seq_len);
  ctx.rope_sin_TH = rope_sin_.narrow(0, 0, seq_len);
  ctx.aux_loss = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  ctx.z_loss = at::zeros({}, at::TensorOptions().dtype(at::kFloat).device(device));
  ctx.parallel = &parallel_;
  return ctx;
}

PipelineStage MoEModel::whole_model_stage() const {
  PipelineStage all;
  all.embedding = all.head = true;
  all.num_layers = config_.num_layers;
  return all;
}

ModelOutput MoEModel::forward(const at::Tensor& tokens, at::ScalarType compute_dtype, bool fp8) {
  const StageOutput out = forward_stage(whole_model_stage(), tokens, {}, compute_dtype, fp8);
  at::Tensor loss = out.ce_loss + out.aux_loss + out.z_loss;
  if (out.mtp_loss.defined()) loss = loss + out.mtp_loss;
  const at::Tensor mtp_losses = out.mtp_losses.defined() ? out.mtp_losses.detach() : at::zeros({0}, out.ce_loss.options());
  return {loss, out.ce_loss.detach(), out.aux_loss.detach(), out.z_loss.detach(), mtp_losses};
}

StageOutput MoEModel::forward_stage(const PipelineStage& stage, const at::Tensor& tokens, const at::Tensor& hidden_in,
                                    at::ScalarType compute_dtype, bool fp8) {
  const int64_t seq_len = tokens.size(1) - 1;
  if (parallel_.sp() && (tokens.size(0) * (tokens.size(1) - 1)) % parallel_.mesh.shape().tp != 0) {
    throw std::invalid_argument("parallel.sequence_parallel: the micro-batch's " + std::to_string(tokens.size(0) * (tokens.size(1) - 1)) +
                                " tokens do not split over tp " + std::to_string(parallel_.mesh.shape().tp));
  }
  if (seq_len > config_.max_seq_len) {
    throw std::invalid_argument("sequence length " + std::to_string(seq_len) + " exceeds model.max_seq_len " +
                                std::to_string(config_.max_seq_len));
  }
  ForwardContext ctx = make_context(tokens.size(0), seq_len, tokens.device(), compute_dtype, fp8);

  at::Tensor x = stage.embedding ? embedding->forward(tokens.narrow(1, 0, seq_len), parallel_) : hidden_in;
  for (int64_t i = stage.first_layer; i < stage.first_layer + stage.num_layers; ++i) x = layers[static_cast<size_t>(i)]->forward(x, ctx);
  StageOutput out;
  out.aux_loss = ctx.aux_loss;
  out.z_loss = ctx.z_loss;
  if (stage.head) {
    out.ce_loss = head->forward(x, tokens.narrow(1, 1, seq_len), compute_dtype, parallel_);
    if (!mtp.empty()) {
      add_mtp_losses(out, x, tokens, ctx);
      out.aux_loss = ctx.aux_loss;  // the MTP blocks' MoE terms too
      out.z_loss = ctx.z_loss;
    }
  } else {
    out.hidden = x;
  }
  return out;
}

void MoEModel::add_mtp_losses(StageOutput& out, const at::Tensor& x, const at::Tensor& tokens, ForwardContext& ctx) {
  if (embedding->weight.numel() == 0) {
    throw std::logic_error("model.mtp_depth: the stage with the head needs the embedding on its rank (pp 1, or dualpipev)");
  }
  const int64_t b = tokens.size(0), t = tokens.size(1) - 1, depth = static_cast<int64_t>(mtp.size());
  if (t <= depth) throw std::invalid_argument("model.mtp_depth: " + std::to_string(depth) + " needs sequences longer than that");
  at::Tensor h = x.view({b, t, -1});  // the previous depth's hidden states
  std::vector<at::Tensor> losses;
  for (int64_t k = 1; k <= depth; ++k) {
    MTPModule& m = *mtp[static_cast<size_t>(k - 1)];
    const int64_t len = t - k;  // positions i < T - k see token i + k and predict token i + k + 1
    const at::Tensor emb = embedding->forward(tokens.narrow(1, k, len), parallel_);
    const at::Tensor prev = h.narrow(1, 0, len).reshape({b * len, -1});
    const at::Tensor joined = at::cat({m.embed_norm->forward(emb, ctx.compute_dtype), m.hidden_norm->forward(prev, ctx.compute_dtype)}, -1);
    at::Tensor y = deferrable_linear(joined, m.proj.to(ctx.compute_dtype)).to(at::kFloat);
    ForwardContext inner = ctx;
    inner.seq_len = len;
    inner.rope_cos_TH = ctx.rope_cos_TH.narrow(0, 0, len);
    inner.rope_sin_TH = ctx.rope_sin_TH.narrow(0, 0, len);
    y = m.block->forward(y, inner);
    ctx.aux_loss = inner.aux_loss;
    ctx.z_loss = inner.z_loss;
    losses.push_back(head->loss(m.norm->forward(y, ctx.compute_dtype), tokens.narrow(1, k + 1, len), ctx.compute_dtype, parallel_));
    h = y.view({b, len, -1});
  }
  out.mtp_losses = at::stack(losses);
  out.mtp_loss = out.mtp_losses.sum() * (config_.mtp_loss_weight / static_cast<double>(depth));
}

at::Tensor MoEModel::logits(const at::Tensor& tokens_BT, at::ScalarType compute_dtype) {
  if (parallel_.mesh.shape().world_size() > 1) throw std::invalid_argument("MoEModel::logits: a single-process model only");
  if (tokens_BT.size(1) > config_.max_seq_len) {
    throw std::invalid_argument("sequence length " + std::to_string(tokens_BT.size(1)) + " exceeds model.max_seq_len " +
                                std::to_string(config_.max_seq_len));
  }
  torch::NoGradGuard no_grad;
  ForwardContext ctx = make_context(tokens_BT.size(0), tokens_BT.size(1), tokens_BT.device(), compute_dtype, /*fp8=*/false);
  at::Tensor x = embedding->forward(tokens_BT, parallel_);
  for (const auto& layer : layers) x = layer->forward(x, ctx);
  const at::Tensor logits = deferrable_linear(head->norm->forward(x, compute_dtype), head->weight.to(compute_dtype));
  return logits.to(at::kFloat).view({ctx.batch, ctx.seq_len, -1});
}

std::vector<std::shared_ptr<TransformerLayer>> MoEModel::transformer_layers() const {
  std::vector<std::shared_ptr<TransformerLayer>> all = layers;
  for (const auto& module : mtp) all.push_back(module->block);
  return all;
}

std::vector<std::shared_ptr<MoELayer>> MoEModel::moe_layers() const {
  std::vector<std::shared_ptr<MoELayer>> result;
  for (const auto& layer : layers) {
    if (layer->moe) result.push_back(layer->moe);
  }
  for (const auto& module : mtp) {
    if (module->block->moe) result.push_back(module->block->moe);
  }
  return result;
}

void MoEModel::update_expert_biases(const std::vector<at::Tensor>& loads_E) {
  const auto moes = moe_layers();
  for (size_t i = 0; i < moes.size(); ++i) {
    if (config_.expert_bias_update_rate > 0) update_expert_bias(moes[i]->expert_bias, loads_E[i], config_.expert_bias_update_rate);
    moes[i]->step_load.zero_();
  }
}

}  // namespace fmoe::moe
