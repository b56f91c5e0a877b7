#include "moe/layers.h"

#include <ATen/ATen.h>

#include <cmath>
#include <limits>

#include "moe/dispatch.h"
#include "moe/expert_parallel.h"
#include "moe/grouped_swiglu.h"
#include "moe/linear.h"
#include "moe/rms_norm.h"
#include "moe/rope.h"
#include "parallel/autograd.h"

namespace fmoe::moe {

std::pair<at::Tensor, at::Tensor> rope_tables(int64_t seq_len, int64_t head_dim, double theta, const RopeScaling& scaling) {
  const int64_t half = head_dim / 2;
  const double dim = static_cast<double>(head_dim);
  const at::Tensor pairs = at::arange(half, at::kDouble);
  at::Tensor inv_freq = at::pow(theta, pairs * (2.0 / dim)).reciprocal();
  double attention_factor = 1.0;
  if (scaling.yarn()) {
    // Pairs rotating fewer than beta_slow times over the original context are
    // interpolated (frequency / factor), more than beta_fast times kept, a linear
    // ramp between (the correction range rounded outwards to whole pairs).
    const double factor = scaling.factor;
    const auto correction_pair = [&](double rotations) {
      return dim * std::log(static_cast<double>(scaling.original_max_position_embeddings) / (rotations * 2.0 * M_PI)) /
             (2.0 * std::log(theta));
    };
    const double low = std::max(std::floor(correction_pair(scaling.beta_fast)), 0.0);
    double high = std::min(std::ceil(correction_pair(scaling.beta_slow)), dim - 1);
    if (high == low) high += 0.001;
    const at::Tensor interpolated_share = ((pairs - low) / (high - low)).clamp(0.0, 1.0);
    inv_freq = inv_freq / factor * interpolated_share + inv_freq * (1.0 - interpolated_share);
    attention_factor = scaling.mscale > 0 && scaling.mscale_all_dim > 0
                           ? yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim)
                           : yarn_mscale(factor, 1.0);
  }
  const at::Tensor angles = at::outer(at::arange(seq_len, at::kDouble), inv_freq);
  return {(angles.cos() * attention_factor).to(at::kFloat), (angles.sin() * attention_factor).to(at::kFloat)};
}

at::Tensor apply_rope(const at::Tensor& x, const at::Tensor& cos_TH, const at::Tensor& sin_TH) {
  // x: [B, T, heads, head_dim]
  const int64_t half = x.size(-1) / 2;
  const at::Tensor cos = cos_TH.to(x.scalar_type()).unsqueeze(1);
  const at::Tensor sin = sin_TH.to(x.scalar_type()).unsqueeze(1);
  const at::Tensor x1 = x.narrow(-1, 0, half);
  const at::Tensor x2 = x.narrow(-1, half, half);
  return at::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1);
}

namespace {

// Into a tensor-parallel region: the full tokens, whose gradient sums over tp.
at::Tensor enter_tp(const at::Tensor& h, const Parallelism& par) {
  return par.sp() ? parallel::all_gather_along(h, 0, par.tp(), /*reduce_scatter_grad=*/true) : parallel::copy_to_group(h, par.tp());
}

// Out of it: partial sums over tp added up (and, under sequence parallelism, split by tokens).
at::Tensor exit_tp(const at::Tensor& y, const Parallelism& par) {
  return par.sp() ? parallel::reduce_scatter_along(y, 0, par.tp()) : parallel::reduce_from_group(y, par.tp());
}

}  // namespace

const Parallelism& Parallelism::none() {
  static const Parallelism single;
  return single;
}

at::Tensor project(const at::Tensor& x, const at::Tensor& weight, const ForwardContext& ctx) {
  return ctx.fp8 ? deferrable_linear(x, weight, /*fp8=*/true) : deferrable_linear(x, weight.to(ctx.compute_dtype));
}

RMSNorm::RMSNorm(int64_t dim, double eps) : eps_(eps) {
  weight = register_parameter("weight", at::ones({dim}));
}

at::Tensor RMSNorm::forward(const at::Tensor& x, at::ScalarType out_dtype) { return rms_norm(x, weight, eps_, out_dtype); }

std::pair<at::Tensor, at::Tensor> RMSNorm::forward_residual(const at::Tensor& x, const at::Tensor& delta, at::ScalarType out_dtype) {
  return add_rms_norm(x, delta, weight, eps_, out_dtype);
}

void QkClipState::add(const at::Tensor& q_BHTd, const at::Tensor& k_BHTd, double scale) {
  if (!record || !at::GradMode::is_enabled()) return;
  at::NoGradGuard no_grad;
  const int64_t t = q_BHTd.size(2);
  const at::Tensor future = at::ones({t, t}, q_BHTd.options().dtype(at::kBool)).triu(1);
  at::Tensor heads = at::full({q_BHTd.size(1)}, -std::numeric_limits<float>::infinity(), q_BHTd.options().dtype(at::kFloat));
  // One sequence at a time: [H, T, T] logits, not [B, H, T, T].
  for (int64_t b = 0; b < q_BHTd.size(0); ++b) {
    const at::Tensor logits = at::matmul(q_BHTd[b].to(at::kFloat), k_BHTd[b].to(at::kFloat).transpose(-1, -2)).mul_(scale);
    heads = at::maximum(heads, logits.masked_fill_(future, -std::numeric_limits<float>::infinity()).amax({-1, -2}));
  }
  max_logit = max_logit.defined() ? at::maximum(max_logit, heads) : heads;
}

Attention::Attention(const ModelConfig& c) : num_heads_(c.num_heads), num_kv_heads_(c.num_kv_heads), head_dim_(c.head_dim) {
  const double out_std = c.init_std / std::sqrt(2.0 * static_cast<double>(c.num_layers));
  wqkv = register_parameter("wqkv", at::empty({(c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.hidden_size}).normal_(0, c.init_std));
  wo = register_parameter("wo", at::empty({c.hidden_size, c.num_heads * c.head_dim}).normal_(0, out_std));
  if (c.attention_bias) bqkv = register_parameter("bqkv", at::zeros({(c.num_heads + 2 * c.num_kv_heads) * c.head_dim}));
}

at::Tensor Attention::forward(const at::Tensor& h_in, const ForwardContext& ctx) {
  const int64_t b = ctx.batch, t = ctx.seq_len;
  // Local heads: all of them, or this rank's 1 / tp (column-parallel wqkv, row-parallel wo).
  const int64_t heads = wo.size(1) / head_dim_;
  const int64_t kv_heads = (wqkv.size(0) / head_dim_ - heads) / 2;
  const at::Tensor h = enter_tp(h_in, *ctx.parallel);
  at::Tensor qkv_flat = project(h, wqkv, ctx);
  if (bqkv.defined()) qkv_flat = qkv_flat + bqkv.to(qkv_flat.scalar_type());
  const at::Tensor qkv = qkv_flat.view({b, t, heads + 2 * kv_heads, head_dim_});
  const RotatedQkv r = split_qkv_rope(qkv, heads, kv_heads, ctx.rope_cos_TH, ctx.rope_sin_TH);
  if (qk_clip.record) {
    const at::Tensor k = r.k_BTKd.repeat_interleave(heads / kv_heads, 2);  // query head h reads key head h / (H / Hkv)
    qk_clip.add(r.q_BTHd.transpose(1, 2), k.transpose(1, 2), 1.0 / std::sqrt(static_cast<double>(head_dim_)));
  }
  const at::Tensor context = at::scaled_dot_product_attention(
      r.q_BTHd.transpose(1, 2), r.k_BTKd.transpose(1, 2), r.v_BTKd.transpose(1, 2), /*attn_mask=*/{}, /*dropout_p=*/0.0,
      /*is_causal=*/true, /*scale=*/std::nullopt, /*enable_gqa=*/kv_heads != heads);
  return exit_tp(project(context.transpose(1, 2).reshape({b * t, heads * head_dim_}), wo, ctx), *ctx.parallel);
}

MLAttention::MLAttention(const ModelConfig& c)
    : num_heads_(c.num_heads), nope_(c.qk_nope_head_dim), rope_(c.qk_rope_head_dim), v_dim_(c.v_head_dim),
      kv_rank_(c.kv_lora_rank), scale_(c.softmax_scale()) {
  const int64_t d = c.hidden_size, h = c.num_heads, qk = c.qk_head_dim();
  const double out_std = c.init_std / std::sqrt(2.0 * static_cast<double>(c.num_layers));
  const auto normal = [&](std::vector<int64_t> shape, double std) { return at::empty(shape).normal_(0, std); };
  if (c.q_lora_rank > 0) {
    wq_a = register_parameter("wq_a", normal({c.q_lora_rank, d}, c.init_std));
    q_a_norm = register_module("q_a_norm", std::make_shared<RMSNorm>(c.q_lora_rank, c.norm_eps));
    wq_b = register_parameter("wq_b", normal({h * qk, c.q_lora_rank}, c.init_std));
  } else {
    wq = register_parameter("wq", normal({h * qk, d}, c.init_std));
  }
  wkv_a = register_parameter("wkv_a", normal({c.kv_lora_rank + c.qk_rope_head_dim, d}, c.init_std));
  kv_a_norm = register_module("kv_a_norm", std::make_shared<RMSNorm>(c.kv_lora_rank, c.norm_eps));
  wkv_b = register_parameter("wkv_b", normal({h * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank}, c.init_std));
  wo = register_parameter("wo", normal({d, h * c.v_head_dim}, out_std));
}

at::Tensor MLAttention::forward(const at::Tensor& h_in, const ForwardContext& ctx) {
  const int64_t b = ctx.batch, t = ctx.seq_len;
  const int64_t heads = wo.size(1) / v_dim_;  // this rank's (all, or 1 / tp)
  const at::Tensor h = enter_tp(h_in, *ctx.parallel);
  // Queries: full rank, or through the normed latent.
  const at::Tensor q_flat = wq.defined() ? project(h, wq, ctx) : project(q_a_norm->forward(project(h, wq_a, ctx).to(at::kFloat), ctx.compute_dtype), wq_b, ctx);
  const at::Tensor q = q_flat.view({b, t, heads, nope_ + rope_});
  // Keys and values: one down-projection to the latent and the shared rotary key.
  const at::Tensor kv_a = project(h, wkv_a, ctx).view({b, t, kv_rank_ + rope_});
  const at::Tensor latent = kv_a_norm->forward(kv_a.narrow(-1, 0, kv_rank_).to(at::kFloat), ctx.compute_dtype);
  const at::Tensor k_rope = apply_rope(kv_a.narrow(-1, kv_rank_, rope_).unsqueeze(2), ctx.rope_cos_TH, ctx.rope_sin_TH);
  const at::Tensor kv = project(latent, wkv_b, ctx).view({b, t, heads, nope_ + v_dim_});
  const at::Tensor query = at::cat({q.narrow(-1, 0, nope_), apply_rope(q.narrow(-1, nope_, rope_), ctx.rope_cos_TH, ctx.rope_sin_TH)}, -1);
  const at::Tensor key = at::cat({kv.narrow(-1, 0, nope_), k_rope.expand({b, t, heads, rope_})}, -1);
  const at::Tensor value = kv.narrow(-1, nope_, v_dim_);
  qk_clip.add(query.transpose(1, 2), key.transpose(1, 2), scale_);
  const at::Tensor context = at::scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                                              /*attn_mask=*/{}, /*dropout_p=*/0.0, /*is_causal=*/true, scale_);
  return exit_tp(project(context.transpose(1, 2).reshape({b * t, heads * v_dim_}), wo, ctx), *ctx.parallel);
}

void Attention::clip_heads(const at::Tensor& gamma) {
  at::NoGradGuard no_grad;
  const int64_t heads = wo.size(1) / head_dim_, kv_heads = (wqkv.size(0) / head_dim_ - heads) / 2, group = heads / kv_heads;
  const at::Tensor g = gamma.to(at::kFloat).to(wqkv.device());
  const at::Tensor key = g.view({kv_heads, group}).amin(1).sqrt();                         // [Hkv]
  const at::Tensor query = g / key.repeat_interleave(group);                               // [H]
  const at::Tensor rows = at::cat({query, key, at::ones({kv_heads}, g.options())}).repeat_interleave(head_dim_);  // q | k | v
  wqkv.mul_(rows.unsqueeze(1).to(wqkv.scalar_type()));
  if (bqkv.defined()) bqkv.mul_(rows.to(bqkv.scalar_type()));
}

void MLAttention::clip_heads(const at::Tensor& gamma) {
  at::NoGradGuard no_grad;
  const int64_t heads = wo.size(1) / v_dim_;
  const at::Tensor g = gamma.to(at::kFloat).to(wo.device()).view({heads, 1});
  // Query rows per head: [nope | rope]; key-value rows per head: [nope | v].
  const at::Tensor q_rows = at::cat({g.sqrt().expand({heads, nope_}), g.expand({heads, rope_})}, 1).reshape({-1});
  const at::Tensor kv_rows = at::cat({g.sqrt().expand({heads, nope_}), at::ones({heads, v_dim_}, g.options())}, 1).reshape({-1});
  at::Tensor& wq_rows = wq.defined() ? wq : wq_b;
  wq_rows.mul_(q_rows.unsqueeze(1).to(wq_rows.scalar_type()));
  wkv_b.mul_(kv_rows.unsqueeze(1).to(wkv_b.scalar_type()));
}

DenseFFN::DenseFFN(int64_t hidden, int64_t ffn_hidden) {
  w13 = register_parameter("w13", at::empty({1, hidden, 2 * ffn_hidden}));
  w2 = register_parameter("w2", at::empty({1, ffn_hidden, hidden}));
}

at::Tensor DenseFFN::forward(const at::Tensor& h_in, const ForwardContext& ctx) {
  const at::Tensor h = enter_tp(h_in, *ctx.parallel);
  const at::Tensor y = ctx.fp8 ? grouped_swiglu(h, w13, w2, {h.size(0)}, /*fp8=*/true)
                               : grouped_swiglu(h, w13.to(ctx.compute_dtype), w2.to(ctx.compute_dtype), {h.size(0)});
  return exit_tp(y, *ctx.parallel);
}

namespace {

// Pads each group of rows up to a multiple of pad with zero rows, so the grouped
// GEMM shapes repeat from step to step (oneDNN's kernel cache hits), and strips
// the padding from the result. Index arithmetic per group, none per token.
at::Tensor run_padded(const at::Tensor& x, const std::vector<int64_t>& rows, int64_t pad, const ExpertCompute& compute) {
  if (pad <= 1) return compute(x, rows);
  std::vector<int64_t> padded(rows.size()), shift(rows.size());
  int64_t real = 0, total = 0;
  for (size_t e = 0; e < rows.size(); ++e) {
    padded[e] = (rows[e] + pad - 1) / pad * pad;
    shift[e] = total - real;
    real += rows[e];
    total += padded[e];
  }
  const at::TensorOptions index = x.options().dtype(at::kLong);
  const at::Tensor positions =
      at::arange(real, index) +
      at::repeat_interleave(at::tensor(shift, at::kLong), at::tensor(rows, at::kLong), /*dim=*/0, /*output_size=*/real).to(x.device());
  const at::Tensor gather = at::full({total}, real, index).index_put_({positions}, at::arange(real, index));
  const at::Tensor x_padded = at::cat({x, at::zeros({1, x.size(1)}, x.options())}).index_select(0, gather);
  return compute(x_padded, padded).index_select(0, positions);
}

void init_ffn(at::Tensor& w13, at::Tensor& w2, const ModelConfig& c) {
  torch::NoGradGuard no_grad;
  w13.normal_(0, c.init_std);
  w2.normal_(0, c.init_std / std::sqrt(2.0 * static_cast<double>(c.num_layers)));
}

}  // namespace

MoELayer::MoELayer(const ModelConfig& c) : config_(c), router_options_(RouterOptions::from(c)) {
  const int64_t e = c.num_experts, d = c.hidden_size, f = c.moe_ffn_hidden_size;
  router_weight = register_parameter("router_weight", at::empty({e, d}).normal_(0, c.init_std));
  w13 = register_parameter("w13", at::empty({e, d, 2 * f}));
  w2 = register_parameter("w2", at::empty({e, f, d}));
  init_ffn(w13, w2, c);
  expert_bias = register_buffer("expert_bias", at::zeros({e}));
  step_load = register_buffer("step_load", at::zeros({e}, at::kLong));
  if (c.num_shared_experts > 0) {
    shared = register_module("shared", std::make_shared<DenseFFN>(d, c.num_shared_experts * f));
    init_ffn(shared->w13, shared->w2, c);
    if (c.shared_expert_gate) shared_gate = register_parameter("shared_gate", at::empty({1, d}).normal_(0, c.init_std));
  }
}

at::Tensor MoELayer::forward(const at::Tensor& h_in, ForwardContext& ctx) {
  const Parallelism& par = *ctx.parallel;
  // Under sequence parallelism the router sees every token of the micro-batch; each
  // tp rank computes the same routing, so its gradient is taken as-is (own slice).
  const at::Tensor h = par.sp() ? parallel::all_gather_along(h_in, 0, par.tp()) : h_in;
  // The router runs in fp32: its scores decide discrete choices.
  const at::Tensor logits = deferrable_linear(h.to(at::kFloat), router_weight);
  const Routing routing = route(logits, expert_bias, router_options_);
  last_experts_TK = routing.experts_TK;
  const ExpertCompute experts = [&](const at::Tensor& x, const std::vector<int64_t>& rows) {
    if (ctx.fp8) return grouped_swiglu(x, w13, w2, rows, /*fp8=*/true);
    if (ctx.grouped_mm) {
      return grouped_swiglu_grouped_mm(x, w13.to(ctx.compute_dtype), w2.to(ctx.compute_dtype), group_ends(rows, x.device()));
    }
    return grouped_swiglu(x, w13.to(ctx.compute_dtype), w2.to(ctx.compute_dtype), rows);
  };
  // The experts (and shared experts) may be split over tp along their width: their
  // input gradients are partial sums, added up over tp by copy_to_group's backward.
  const at::Tensor x = enter_tp(h_in, par);
  // Capacity: assignments beyond an expert's share of this rank's tokens are dropped.
  at::Tensor keep;
  if (config_.capacity_factor > 0) {
    const int64_t capacity = expert_capacity(config_.capacity_factor, h.size(0), config_.top_k, config_.num_experts);
    keep = capacity_mask(routing.experts_TK, routing.probs_TK, config_.num_experts, capacity);
  }
  at::Tensor out;
  // The device plan counts each expert's choices itself; the other routes count them here.
  const bool device_plan = par.ep().size() == 1 && ctx.grouped_mm && !keep.defined();
  if (!device_plan) step_load.add_(count_per_expert(routing.experts_TK, config_.num_experts));
  if (par.ep().size() > 1) {
    // The received rows arrive unpadded: pad them per local expert here.
    const ExpertCompute padded = [&](const at::Tensor& rows_x, const std::vector<int64_t>& rows) {
      return run_padded(rows_x, rows, ctx.expert_pad_multiple, experts);
    };
    out = par.dispatcher == ExpertDispatcher::kAllToAll
              ? dispatch_all_to_all(x, routing.experts_TK, routing.probs_TK, config_.num_experts, padded, par.ep(), par.tp(), keep,
                                    par.ep_overlap ? 2 : 1)
              : dispatch_all_gather(x, routing.experts_TK, routing.probs_TK, config_.num_experts, padded, par.ep(), par.tp(), keep);
  } else if (device_plan) {
    // The GPU path: routing, permutation and grouped GEMMs without the host seeing a count.
    const DispatchPlan plan = make_device_dispatch_plan(routing.experts_TK, config_.num_experts);
    step_load.add_(plan.tokens_per_expert_E);
    const at::Tensor y_sorted =
        grouped_swiglu_grouped_mm(permute_tokens(x, plan), w13.to(ctx.compute_dtype), w2.to(ctx.compute_dtype), plan.ends_E);
    out = unpermute_and_combine(parallel::reduce_from_group(y_sorted, par.tp()), routing.probs_TK, plan);
  } else {
    const DispatchPlan plan = make_dispatch_plan(routing.experts_TK, config_.num_experts, ctx.expert_pad_multiple, keep);
    const at::Tensor y_sorted = experts(permute_tokens(x, plan), plan.rows_per_expert);
    out = unpermute_and_combine(parallel::reduce_from_group(y_sorted, par.tp()), routing.probs_TK, plan);
  }
  // The combined output is complete on every tp rank: each keeps its own tokens.
  if (par.sp()) out = parallel::scatter_along(out, 0, par.tp());
  if (shared) {
    at::Tensor shared_out = shared->forward(h_in, ctx).to(at::kFloat);
    if (shared_gate.defined()) shared_out = shared_out * deferrable_linear(h_in.to(at::kFloat), shared_gate).sigmoid();
    out = out + shared_out;
  }

  if (config_.aux_loss_coeff > 0) {
    ctx.aux_loss = ctx.aux_loss + config_.aux_loss_coeff * sequence_balance_loss(routing.scores_TE, routing.experts_TK, ctx.batch);
  }
  if (config_.z_loss_coeff > 0) ctx.z_loss = ctx.z_loss + config_.z_loss_coeff * router_z_loss(logits);
  return out;
}

TransformerLayer::TransformerLayer(const ModelConfig& c, int64_t layer_index) {
  attention_norm = register_module("attention_norm", std::make_shared<RMSNorm>(c.hidden_size, c.norm_eps));
  if (c.is_mla()) {
    mla = register_module("attention", std::make_shared<MLAttention>(c));
  } else {
    attention = register_module("attention", std::make_shared<Attention>(c));
  }
  ffn_norm = register_module("ffn_norm", std::make_shared<RMSNorm>(c.hidden_size, c.norm_eps));
  if (c.is_moe_layer(layer_index)) {
    moe = register_module("moe", std::make_shared<MoELayer>(c));
  } else {
    dense = register_module("ffn", std::make_shared<DenseFFN>(c.hidden_size, c.ffn_hidden_size));
    init_ffn(dense->w13, dense->w2, c);
  }
}

at::Tensor TransformerLayer::forward(const at::Tensor& x, ForwardContext& ctx) {
  const at::Tensor normed = attention_norm->forward(x, ctx.compute_dtype);
  const at::Tensor attn = mla ? mla->forward(normed, ctx) : attention->forward(normed, ctx);
  const auto [y, h] = ffn_norm->forward_residual(x, attn, ctx.compute_dtype);
  return y + (moe ? moe->forward(h, ctx) : dense->forward(h, ctx).to(at::kFloat));
}

}  // namespace fmoe::moe
