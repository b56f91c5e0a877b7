#include "moe/model.h"

#include "moe/cross_entropy.h"

#include <ATen/ATen.h>
#include <torch/nn/modules/container/modulelist.h>

#include <stdexcept>

namespace fmoe::moe {

EmbeddingStage::EmbeddingStage(const ModelConfig& c) {
  weight = register_parameter("weight", at::empty({c.vocab_size, c.hidden_size}).normal_(0, c.init_std));
}

at::Tensor EmbeddingStage::forward(const at::Tensor& tokens_BT) {
  return weight.index_select(0, tokens_BT.reshape({-1}));
}

HeadStage::HeadStage(const ModelConfig& c) {
  norm = register_module("norm", std::make_shared<RMSNorm>(c.hidden_size, c.norm_eps));
  weight = register_parameter("weight", at::empty({c.vocab_size, c.hidden_size}).normal_(0, c.init_std));
}

at::Tensor HeadStage::forward(const at::Tensor& x, const at::Tensor& targets_BT, at::ScalarType compute_dtype) {
  const at::Tensor logits = at::linear(norm->forward(x, compute_dtype), weight.to(compute_dtype));
  // The loss reduces in FP32 (a BF16 log-softmax would round it to ~3 digits),
  // chunk by chunk, without an FP32 copy of the logits.
  return chunked_cross_entropy(logits, targets_BT.reshape({-1}));
}

MoEModel::MoEModel(const ModelConfig& config) : config_(config) {
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
  std::tie(rope_cos_, rope_sin_) = rope_tables(config.max_seq_len, config.head_dim, config.rope_theta);
}

ModelOutput MoEModel::forward(const at::Tensor& tokens, at::ScalarType compute_dtype, bool fp8) {
  const int64_t seq_len = tokens.size(1) - 1;
  if (seq_len > config_.max_seq_len) {
    throw std::invalid_argument("sequence length " + std::to_string(seq_len) + " exceeds model.max_seq_len " +
                                std::to_string(config_.max_seq_len));
  }
  ForwardContext ctx;
  ctx.compute_dtype = compute_dtype;
  // BF16 GEMMs go through oneDNN, which JIT-compiles a kernel per shape: padded
  // expert groups keep the set of shapes small. FP32 runs unpadded.
  ctx.expert_pad_multiple = compute_dtype == at::kBFloat16 && !fp8 ? 64 : 1;
  ctx.fp8 = fp8;
  ctx.batch = tokens.size(0);
  ctx.seq_len = seq_len;
  ctx.rope_cos_TH = rope_cos_.narrow(0, 0, seq_len);
  ctx.rope_sin_TH = rope_sin_.narrow(0, 0, seq_len);
  ctx.aux_loss = at::zeros({}, at::kFloat);
  ctx.z_loss = at::zeros({}, at::kFloat);

  at::Tensor x = embedding->forward(tokens.narrow(1, 0, seq_len));
  for (auto& layer : layers) x = layer->forward(x, ctx);
  const at::Tensor ce = head->forward(x, tokens.narrow(1, 1, seq_len), compute_dtype);
  return {ce + ctx.aux_loss + ctx.z_loss, ce.detach(), ctx.aux_loss.detach(), ctx.z_loss.detach()};
}

std::vector<std::shared_ptr<MoELayer>> MoEModel::moe_layers() const {
  std::vector<std::shared_ptr<MoELayer>> result;
  for (const auto& layer : layers) {
    if (layer->moe) result.push_back(layer->moe);
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
