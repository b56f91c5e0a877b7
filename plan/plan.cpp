#include "plan/plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "fp8/low_precision_tensor.h"
#include "moe/model_config.h"
#include "moe/stage_split.h"
#include "parallel/pipeline_schedule.h"
#include "plan/pipeline_sim.h"

// The planner's model: memory, FLOPs, communication and the step time of one layout.
namespace fmoe::plan {

using config::Config;
using config::ConfigError;
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

double dtype_bytes(const std::string& dtype, int64_t block) {
  return fp8::storage_bytes_per_value(fp8::parse_storage_dtype(dtype), block);
}

// Activation bytes one token leaves for backward in one layer, before
// tensor-parallel sharding. BF16 elements; with FP8 GEMMs the inputs cached for
// the expert GEMMs are FP8 (1 byte), as DeepSeek-V3 caches them; FP32 router scores.
double activation_bytes_per_token_layer(const moe::ModelConfig& m, bool moe_layer, const std::string& recompute, bool fp8,
                                        double imbalance) {
  const double d = static_cast<double>(m.hidden_size), h = static_cast<double>(m.num_heads);
  if (recompute == "full") return 2.0 * d;  // the layer input alone
  const bool selective = recompute == "selective";
  double latent = 0, expanded;  // MLA: compressed q / kv inputs, and the up-projected per-head q, k, v
  if (m.is_mla()) {
    latent = static_cast<double>(m.q_lora_rank + m.kv_lora_rank + m.qk_rope_head_dim);
    expanded = h * m.qk_head_dim() + h * (m.qk_nope_head_dim + m.v_head_dim);
  } else {
    expanded = h * m.head_dim + 2.0 * m.num_kv_heads * m.head_dim;
  }
  // Residual and attention input; norm outputs unless recomputed; Q/K/V (MLA: recomputed from
  // the latents under selective recompute); the attention output feeding the projection.
  double bytes = 2.0 * (d + (selective ? 0 : 2 * d) + latent + (selective && m.is_mla() ? 0 : expanded) + h * m.value_head_dim());
  if (!moe_layer) {
    return bytes + 2.0 * (selective ? 2.0 : 3.0) * m.ffn_hidden_size;  // gate/up (and the activation)
  }
  const double fm = static_cast<double>(m.moe_ffn_hidden_size);
  const double cached = fp8 ? 1.0 : 2.0;
  // Per routed copy: the dispatched row and the activation (GEMM inputs) plus the gate/up output.
  const double per_copy = cached * (d + (selective ? 0 : fm)) + 2.0 * 2 * fm;
  bytes += imbalance * m.top_k * per_copy + m.num_shared_experts * per_copy;
  bytes += 4.0 * m.num_experts;  // FP32 router scores
  return bytes;
}

// What the CPU implementation's autograd graph holds per token per layer while a
// micro-batch is in flight: the FP32 residual stream and norm inputs, compute-dtype
// (c bytes) norm outputs, Q/K/V before and after RoPE, attention output, FP32 casts
// back to the residual; MoE: the FP32 router input and scores, per routed copy the
// dispatched row, gate/up output, activation and expert output, the FP32 combine.
double cpu_activation_bytes_per_token_layer(const moe::ModelConfig& m, bool moe_layer, double c) {
  const double d = static_cast<double>(m.hidden_size);
  const double q = static_cast<double>(m.num_heads * m.head_dim), kv = static_cast<double>(m.num_kv_heads * m.head_dim);
  const auto swiglu = [&](double f) { return c * (d + 3 * f + d) + 4 * d; };  // input, gate/up, activation, output, FP32 cast
  double bytes = 4 * d * 4 + c * (d + (q + 2 * kv) + (q + kv) + q);             // attention block
  bytes += 4 * d + c * d;                                                         // FFN norm
  if (!moe_layer) return bytes + swiglu(static_cast<double>(m.ffn_hidden_size));
  const double f = static_cast<double>(m.moe_ffn_hidden_size);
  bytes += 4 * d + 3 * 4.0 * m.num_experts;                      // router input, logits, scores, probabilities
  bytes += m.top_k * (swiglu(f) - 4 * d) + 4 * d * 2;            // routed copies, weighted combine and sum
  bytes += m.num_shared_experts * swiglu(f);
  return bytes;
}

// The memory-bound element-wise work of one token through one layer, forward
// and backward, in elements read plus written (times the element size for
// bytes): `residual` is the work on the residual stream, which every tensor-
// parallel rank repeats whole unless sequence parallelism splits it by tokens:
// two RMSNorms (forward x -> y, backward x, dy -> dx: 5 d each), two residual
// adds (6 d each), and in an MoE layer the router's scores and top-k (~4 E) and
// the dispatch and combine copies of the top-k rows (gather and weighted sum
// forward, scatter and weight gradients backward: ~8 k d). `sharded` is what
// tensor parallelism divides: the SwiGLU activation on each expert copy's width
// (forward reads gate and up, writes the product; backward reads three, writes
// two: 8 f).
struct ElementwiseElements {
  double residual = 0, sharded = 0;
};
ElementwiseElements elementwise_elements_per_token_layer(const moe::ModelConfig& m, bool moe_layer) {
  const double d = static_cast<double>(m.hidden_size);
  ElementwiseElements e;
  e.residual = 2 * 5 * d + 2 * 6 * d;
  if (!moe_layer) {
    e.sharded = 8.0 * static_cast<double>(m.ffn_hidden_size);
    return e;
  }
  const double k = static_cast<double>(m.top_k), fm = static_cast<double>(m.moe_ffn_hidden_size);
  e.residual += 4.0 * static_cast<double>(m.num_experts) + 8.0 * k * d;
  e.sharded = 8.0 * (k + static_cast<double>(m.num_shared_experts)) * fm;
  return e;
}

double link_gb_per_s(const ClusterSpec& c, int64_t span_gpus) {
  return span_gpus <= c.gpus_per_node ? c.intra_node_gb_per_s : c.inter_node_gb_per_s;
}

}  // namespace

std::string Layout::describe() const {
  char text[160];
  std::snprintf(text, sizeof(text), "tp%lld pp%lld ep%lld dp%lld%s mb%lld x%lld%s", static_cast<long long>(tp),
                static_cast<long long>(pp), static_cast<long long>(ep), static_cast<long long>(dp), zero1 ? " zero1" : "",
                static_cast<long long>(micro_batch_size), static_cast<long long>(num_micro_batches),
                recompute == "none" ? "" : (" recompute=" + recompute).c_str());
  return text;
}

std::string resolved_schedule(const Layout& layout) {
  if (layout.pipeline_schedule != "auto") return layout.pipeline_schedule;
  return layout.virtual_pp > 1 ? "interleaved" : "1f1b";
}

namespace {

// A chunk's forward, input gradient and weight gradient a third each of its
// training time; its whole backward two thirds.
plan::PipeCosts costs_per_chunk(double seconds) {
  plan::PipeCosts c;
  c.forward = c.input_grad = c.weight_grad = seconds / 3;
  c.backward = 2 * seconds / 3;
  return c;
}

struct PipelineFigures {
  std::string schedule;
  double overhead = 0;        // idle / compute, mean over ranks
  int64_t peak_in_flight = 0; // in whole-stage micro-batches: chunk activations / v
};

// Simulated on unit costs (the ratio does not depend on the time scale) and
// cached: a layout search asks for the same few schedules many times.
PipelineFigures pipeline_figures(const Layout& layout) {
  static std::mutex mutex;
  static std::map<std::tuple<std::string, int64_t, int64_t, int64_t>, PipelineFigures> cache;
  const std::string name = resolved_schedule(layout);
  const auto key = std::make_tuple(name, layout.pp, layout.virtual_pp, layout.num_micro_batches);
  std::lock_guard<std::mutex> lock(mutex);
  if (const auto it = cache.find(key); it != cache.end()) return it->second;
  parallel::PipelineSchedule schedule;
  try {
    schedule = parallel::make_schedule(name, static_cast<int>(layout.pp), static_cast<int>(layout.virtual_pp),
                                       static_cast<int>(layout.num_micro_batches));
  } catch (const std::invalid_argument& e) {
    throw ConfigError("layout " + layout.describe() + ": parallel.pipeline_schedule: " + e.what());
  }
  const double v = static_cast<double>(layout.virtual_pp);
  const plan::PipeSimResult r = plan::simulate(schedule, costs_per_chunk(3.0 / v));
  PipelineFigures f;
  f.schedule = name;
  double idle = 0, busy = 0;
  for (size_t i = 0; i < r.busy.size(); ++i) idle += r.idle[i], busy += r.busy[i];
  f.overhead = busy > 0 ? idle / busy : 0;
  const int peak = *std::max_element(r.peak_activations.begin(), r.peak_activations.end());
  f.peak_in_flight = static_cast<int64_t>(std::ceil(static_cast<double>(peak) / v));
  return cache.emplace(key, f).first->second;
}

}  // namespace

plan::PipeCosts chunk_costs(const Plan& plan) {
  return costs_per_chunk(plan.compute_seconds / static_cast<double>(plan.layout.num_micro_batches * plan.layout.virtual_pp));
}

Layout layout_from_config(const Config& config, int64_t gpus) {
  Layout l;
  l.tp = config.parallel.tp;
  l.pp = config.parallel.pp;
  l.ep = config.parallel.ep;
  l.virtual_pp = config.parallel.virtual_pp;
  l.zero1 = config.parallel.zero1;
  l.dp = config.parallel.dp > 0 ? config.parallel.dp : gpus / std::max<int64_t>(1, l.tp * l.pp);
  l.micro_batch_size = config.training.micro_batch_size;
  l.num_micro_batches = config.training.grad_accum_steps;
  l.recompute = config.training.recompute;
  l.pipeline_schedule = config.parallel.pipeline_schedule;
  l.pipeline_layout = config.parallel.pipeline_layout;
  return l;
}

NewtonSchulzFlops newton_schulz_flops(const moe::ModelConfig& m, int64_t steps) {
  const auto one = [&](double rows, double cols) {
    const double a = std::min(rows, cols), b = std::max(rows, cols);
    return static_cast<double>(steps) * (4 * a * a * b + 2 * a * a * a);
  };
  const double d = static_cast<double>(m.hidden_size), h = static_cast<double>(m.num_heads);
  double attention = 0;
  if (m.is_mla()) {
    const double qk = static_cast<double>(m.qk_head_dim()), rq = static_cast<double>(m.q_lora_rank);
    const double rkv = static_cast<double>(m.kv_lora_rank);
    attention = (m.q_lora_rank > 0 ? one(rq, d) + one(h * qk, rq) : one(h * qk, d)) +
                one(rkv + static_cast<double>(m.qk_rope_head_dim), d) +
                one(h * static_cast<double>(m.qk_nope_head_dim + m.v_head_dim), rkv) + one(d, h * static_cast<double>(m.v_head_dim));
  } else {
    const double hd = static_cast<double>(m.head_dim), kv = static_cast<double>(m.num_kv_heads) * hd;
    attention = one(h * hd, d) + 2 * one(kv, d) + one(d, h * hd);  // q, k, v apart; wo
  }
  const auto ffn = [&](double width) { return width > 0 ? 2 * one(d, width) + one(width, d) : 0.0; };  // gate, up; down
  const double fm = static_cast<double>(m.moe_ffn_hidden_size);
  const double moe_layers = static_cast<double>(m.num_moe_layers() + m.mtp_depth);  // MTP modules hold an MoE layer each
  NewtonSchulzFlops f;
  f.dense = static_cast<double>(m.num_layers + m.mtp_depth) * attention + static_cast<double>(m.first_k_dense) * ffn(static_cast<double>(m.ffn_hidden_size)) +
            moe_layers * ffn(static_cast<double>(m.num_shared_experts) * fm) + static_cast<double>(m.mtp_depth) * one(d, 2 * d);
  f.experts = moe_layers * static_cast<double>(m.num_experts) * ffn(fm);
  return f;
}

// One function of ~150 lines on purpose: the plan is one pass of arithmetic
// (memory, communication, step time, cost) whose parts share a dozen
// intermediate quantities; split, each piece would take most of them as arguments.
Plan make_plan(const Config& config, const ClusterSpec& cluster, Layout layout, double tokens, const Assumptions& a) {
  const moe::ModelConfig& m = config.model;
  const config::OptimizerConfig& o = config.optimizer;
  const auto bad = [&](const std::string& why) { return ConfigError("layout " + layout.describe() + ": " + why); };
  if (layout.tp < 1 || layout.pp < 1 || layout.ep < 1 || layout.dp < 1) throw bad("every degree must be >= 1");
  if (layout.dp % layout.ep != 0) throw bad("ep must divide dp (experts are sharded inside the data-parallel group)");
  if (m.num_moe_layers() > 0 && m.num_experts % layout.ep != 0) throw bad("ep must divide num_experts");
  if (m.num_heads % layout.tp != 0) throw bad("tp must divide num_heads");
  if (layout.pp > m.num_layers) throw bad("pp exceeds num_layers");

  Plan p;
  if (layout.recompute != "none" && layout.recompute != "selective" && layout.recompute != "full") {
    throw bad("recompute must be none, selective or full");
  }
  p.layout = layout;
  const moe::ParameterCounts counts = moe::count_parameters(m);
  p.params_total = static_cast<double>(counts.total + counts.mtp);
  p.params_activated = static_cast<double>(counts.activated);
  const int64_t seq = config.training.seq_len;
  p.flops_per_token = moe::training_flops_per_token(m, seq);
  const double tokens_per_micro = static_cast<double>(layout.micro_batch_size * seq);
  p.tokens_per_step = tokens_per_micro * static_cast<double>(layout.num_micro_batches * layout.dp);

  // ---- memory per GPU (the busiest pipeline stage)
  const double moe_layers = static_cast<double>(std::max<int64_t>(1, m.num_moe_layers()));
  const double expert_total = static_cast<double>(counts.routed_experts) * (1.0 + m.mtp_depth / moe_layers);
  const double dense_total = p.params_total - expert_total;
  const double dense_local = dense_total / static_cast<double>(layout.tp * layout.pp);
  const double expert_local = expert_total / static_cast<double>(layout.ep * layout.pp);
  const double local = dense_local + expert_local;
  const int64_t block = o.state_block_size;
  const double zero_dense = layout.zero1 ? static_cast<double>(layout.dp) : 1.0;
  const double zero_expert = layout.zero1 ? static_cast<double>(layout.dp / layout.ep) : 1.0;
  const double sharded = dense_local / zero_dense + expert_local / zero_expert;
  p.memory.weights = local * 2.0;  // BF16 compute copy (FP8 copies are transient per GEMM)
  p.memory.grads = local * dtype_bytes(o.grad_dtype, block);
  p.memory.master = sharded * dtype_bytes(o.main_params_dtype, block);
  // Muon keeps one moment for the hidden matrices (every expert, and the dense
  // side's attention, FFN and MTP projections); the second moment stays with
  // the AdamW parameters (embedding, head, norms, router).
  const double adamw_dense = o.muon() ? static_cast<double>(counts.embedding + counts.head + counts.norms + counts.router) / dense_total : 1.0;
  const double second_moment = dense_local / zero_dense * adamw_dense + (o.muon() ? 0.0 : expert_local / zero_expert);
  p.memory.optimizer = sharded * dtype_bytes(o.exp_avg_dtype, block) + second_moment * dtype_bytes(o.exp_avg_sq_dtype, block);
  // The stages: written, or split by cost; the busiest holds the most layers.
  double layers_per_stage = static_cast<double>(m.num_layers);
  if (layout.pp > 1) {
    const int64_t stages = layout.pp * layout.virtual_pp;
    moe::StageSplit split;
    try {
      split = layout.pipeline_layout.empty() ? moe::balance_stages(m, seq, stages) : moe::parse_stage_layout(layout.pipeline_layout, m, seq, stages);
    } catch (const std::invalid_argument& e) {
      throw bad(std::string("parallel.pipeline_layout: ") + e.what());
    }
    p.stage_layout = split.describe();
    p.stage_imbalance = split.imbalance();
    // A rank holds v chunks: its layers are the sum over them.
    std::vector<double> per_rank(static_cast<size_t>(layout.pp), 0);
    const std::vector<int> placement = parallel::stage_placement(resolved_schedule(layout), static_cast<int>(layout.pp), static_cast<int>(layout.virtual_pp));
    for (size_t s = 0; s < split.stages.size(); ++s) per_rank[static_cast<size_t>(placement[s])] += static_cast<double>(split.stages[s].num_layers);
    layers_per_stage = *std::max_element(per_rank.begin(), per_rank.end());
  }
  const double moe_fraction = static_cast<double>(m.num_moe_layers()) / static_cast<double>(m.num_layers);
  const bool fp8 = config.precision.fp8;
  const double per_token_layer =
      moe_fraction * activation_bytes_per_token_layer(m, true, layout.recompute, fp8, a.moe_imbalance) +
      (1 - moe_fraction) * activation_bytes_per_token_layer(m, false, layout.recompute, fp8, a.moe_imbalance);
  // The schedule's busiest rank holds the most micro-batch stages in flight (1F1B: pp on the first).
  if (layout.pp > 1) {
    const PipelineFigures figures = pipeline_figures(layout);
    p.pipeline_schedule = figures.schedule;
    p.bubble_fraction = figures.overhead;
    p.peak_in_flight = figures.peak_in_flight;
  } else {
    p.peak_in_flight = 1;
  }
  const double in_flight = static_cast<double>(p.peak_in_flight);
  const double logits = tokens_per_micro * static_cast<double>(m.vocab_size) * 4.0 / static_cast<double>(layout.tp);
  p.memory.activations =
      layers_per_stage * tokens_per_micro * per_token_layer * in_flight / static_cast<double>(layout.tp) + logits;
  if (cluster.device == "cpu") {
    // The CPU implementation: the FP32 parameters are the master copy, autograd
    // leaves FP32 gradients, the compute-dtype casts of the weights live through
    // backward, and there is no pipeline, so one micro-batch is in flight. Data
    // parallelism all-reduces a flat FP32 copy of the gradients it reduces, filled
    // during the last micro-batch's backward (the buckets reduce while backward
    // goes on), so that copy stands beside the activations at the peak.
    const double c = config.training.precision == "fp32" ? 4.0 : 2.0;
    p.memory.weights = c == 4.0 ? 0 : local * c;
    p.memory.master = local * dtype_bytes(o.main_params_dtype, block);
    p.memory.grads = local * (4.0 + (o.grad_dtype == "fp32" ? 0 : dtype_bytes(o.grad_dtype, block)));
    const double buckets = (layout.dp > 1 ? dense_local : 0) + (layout.dp / layout.ep > 1 ? expert_local : 0);
    p.memory.grads += 4.0 * buckets;
    const double per_token =
        static_cast<double>(m.first_k_dense) * cpu_activation_bytes_per_token_layer(m, false, c) +
        static_cast<double>(m.num_moe_layers()) * cpu_activation_bytes_per_token_layer(m, true, c) +
        2.0 * c * static_cast<double>(m.vocab_size);  // logits and their gradient
    // BF16 runs hold more beyond the graph than FP32 ones (oneDNN's reordered BF16
    // weights and per-shape primitives, cast temporaries): measured per precision.
    const double overhead = c == 4.0 && cluster.activation_overhead_fp32 > 0 ? cluster.activation_overhead_fp32
                                                                             : cluster.activation_overhead;
    p.memory.activations = tokens_per_micro * per_token * overhead;
  }
  p.memory.runtime = cluster.runtime_gib * kGiB;
  p.fits = p.memory.total() <= cluster.hbm_gib * kGiB * a.memory_headroom;

  // ---- communication per GPU per step
  const double d = static_cast<double>(m.hidden_size);
  const double micro = static_cast<double>(layout.num_micro_batches);
  // A CPU node's peak is all its cores'; the ranks placed on it share them, so
  // two ranks on one node each compute at half of it (a GPU is its own).
  const bool cpu = cluster.device == "cpu";
  const double sharing = cpu ? static_cast<double>(std::min(layout.gpus(), cluster.gpus_per_node)) : 1.0;
  // Each blocking collective costs a latency beyond its bytes; on a CPU node with
  // more ranks than cores, also the wait for a partner that is not running.
  const bool oversubscribed = cpu && cluster.cores_per_node > 0 && sharing > static_cast<double>(cluster.cores_per_node);
  const double latency = 1e-6 * (cluster.collective_latency_us + (oversubscribed ? cluster.oversubscribed_latency_us : 0.0));
  if (layout.tp > 1) {
    // Two all-reduces forward and two backward per layer; a ring moves 2 (n - 1) / n of the buffer.
    const double buffer = tokens_per_micro * d * 2.0;
    const double calls = 4.0 * layers_per_stage * micro;
    p.comm.tp_bytes = calls * buffer * 2.0 * (layout.tp - 1) / layout.tp;
    p.comm.tp_seconds = p.comm.tp_bytes / (link_gb_per_s(cluster, layout.tp) * 1e9) + calls * latency;
    p.collectives += calls;
  }
  if (layout.ep > 1 && m.num_moe_layers() > 0) {
    // Dispatch and combine, forward and backward; dispatch in FP8 when the GEMMs are.
    const double rows = tokens_per_micro / static_cast<double>(layout.tp) * static_cast<double>(m.top_k);
    const double dispatch = rows * d * (config.precision.fp8 ? 1.0 : 2.0), combine = rows * d * 2.0;
    const double moe_per_stage = std::ceil(static_cast<double>(m.num_moe_layers()) / static_cast<double>(layout.pp));
    p.comm.ep_bytes = 2.0 * moe_per_stage * micro * (dispatch + combine) * (layout.ep - 1) / layout.ep;
    // Per layer and micro-batch: the row counts, dispatch and combine forward,
    // their gradients backward; each token chunk of parallel.ep_overlap its own.
    const double calls = 5.0 * moe_per_stage * micro * (config.parallel.ep_overlap ? 2.0 : 1.0);
    p.comm.ep_seconds = p.comm.ep_bytes / (link_gb_per_s(cluster, layout.tp * layout.ep) * 1e9) + calls * latency;
    p.collectives += calls;
  }
  p.latency_seconds = p.collectives * latency;
  if (layout.pp > 1) {
    p.comm.pp_bytes = 2.0 * micro * tokens_per_micro * d * 2.0 / static_cast<double>(layout.tp);
    p.comm.pp_seconds = p.comm.pp_bytes / (link_gb_per_s(cluster, layout.tp * layout.dp * layout.pp) * 1e9);
  }
  {
    // ZeRO-1: reduce-scatter the gradients, all-gather the updated BF16 weights; otherwise an all-reduce.
    const double grad_bytes = dtype_bytes(o.grad_dtype, block);
    const auto volume = [&](double params, double group) {
      if (group <= 1) return 0.0;
      const double per_byte = layout.zero1 ? (grad_bytes + 2.0) : 2.0 * grad_bytes;
      return params * per_byte * (group - 1) / group;
    };
    p.comm.dp_bytes = volume(dense_local, static_cast<double>(layout.dp)) +
                      volume(expert_local, static_cast<double>(layout.dp / layout.ep));
    p.comm.dp_seconds = p.comm.dp_bytes / (link_gb_per_s(cluster, layout.tp * layout.dp) * 1e9);
  }

  // ---- roofline
  const double peak = (config.precision.fp8 ? cluster.peak_fp8_tflops : cluster.peak_bf16_tflops) * 1e12;
  const double gpus = static_cast<double>(layout.gpus());
  const double rank_peak = peak / sharing;
  const double rank_bandwidth = cluster.hbm_tb_per_s * 1e12 / sharing;
  p.gemm_seconds = p.flops_per_token * p.tokens_per_step / gpus / (rank_peak * a.gemm_efficiency);
  if (layout.ep > 1 && m.num_moe_layers() > 0) {
    // Expert-parallel ranks wait for the one whose experts got the most tokens:
    // the routed experts' GEMMs (gate, up, down; 3 passes of 2 FLOPs per
    // multiply-add) run at moe_imbalance times the mean.
    const double routed_per_token = 6.0 * static_cast<double>(m.num_moe_layers()) * static_cast<double>(m.top_k) * 3.0 * d *
                                    static_cast<double>(m.moe_ffn_hidden_size);
    p.expert_rank_imbalance = a.moe_imbalance;
    p.gemm_seconds += (a.moe_imbalance - 1) * routed_per_token * p.tokens_per_step / gpus / (rank_peak * a.gemm_efficiency);
  }
  {
    // Element-wise work at the rank's share of its memory bandwidth, over the
    // rank's tokens (its data-parallel share) and its stage's share of the layers;
    // the CPU implementation keeps it in FP32, a GPU's in BF16.
    const double element = cpu ? 4.0 : 2.0;
    const double tp = static_cast<double>(layout.tp), residual_split = config.parallel.sequence_parallel ? tp : 1.0;
    const ElementwiseElements dense = elementwise_elements_per_token_layer(m, false), moe = elementwise_elements_per_token_layer(m, true);
    const double dense_layers = static_cast<double>(m.num_layers - m.num_moe_layers()), moe_layers_n = static_cast<double>(m.num_moe_layers());
    const double per_token = dense_layers * (dense.residual / residual_split + dense.sharded / tp) +
                             moe_layers_n * (moe.residual / residual_split + moe.sharded / tp);
    p.elementwise_bytes = element * per_token * p.tokens_per_step / static_cast<double>(layout.dp * layout.pp);
    p.elementwise_seconds = p.elementwise_bytes / rank_bandwidth;
  }
  // Full recompute runs each forward twice; selective recomputes cheap element-wise work and
  // the MLA up-projections (a few percent). Every stage waits for the costliest one.
  double factor = (layout.recompute == "full" ? 4.0 / 3.0 : layout.recompute == "selective" ? 1.03 : 1.0) * p.stage_imbalance;
  // A CPU rank of several threads computes at thread_efficiency of its cores.
  if (cpu && cluster.cores_per_node > 0 && static_cast<double>(cluster.cores_per_node) / sharing >= 2) factor /= a.thread_efficiency;
  p.gemm_seconds *= factor;
  p.elementwise_seconds *= factor;
  p.compute_seconds = p.gemm_seconds + p.elementwise_seconds;
  if (o.muon()) {
    // Each rank orthogonalizes what it updates: its stage's dense matrices (all of
    // them, or its ZeRO-1 share) and its experts (their share over the expert-data-parallel group).
    const NewtonSchulzFlops ns = newton_schulz_flops(m, o.muon_ns_steps);
    const double pp = static_cast<double>(layout.pp);
    p.newton_schulz_flops = ns.dense / pp / zero_dense + ns.experts / (static_cast<double>(layout.ep) * pp) / zero_expert;
    p.newton_schulz_seconds = p.newton_schulz_flops / (rank_peak * a.gemm_efficiency);
  }
  p.optimizer_bytes = 2.0 * (p.memory.master + p.memory.optimizer) + sharded * dtype_bytes(o.grad_dtype, block) + p.memory.weights;
  p.optimizer_seconds = p.optimizer_bytes / rank_bandwidth;
  const double exposed = p.comm.tp_seconds * (1 - a.tp_overlap) + p.comm.ep_seconds * (1 - a.ep_overlap) +
                         p.comm.dp_seconds * (1 - a.dp_overlap);
  p.step_seconds = p.compute_seconds * (1 + p.bubble_fraction) + p.newton_schulz_seconds + p.optimizer_seconds + exposed;
  p.comm_seconds = p.comm.tp_seconds + p.comm.ep_seconds + p.comm.pp_seconds + p.comm.dp_seconds;
  p.comm_exposed_seconds = exposed;
  p.mfu = p.flops_per_token * p.tokens_per_step / (p.step_seconds * gpus * rank_peak);
  p.tokens = tokens;
  p.gpu_hours = tokens / p.tokens_per_step * p.step_seconds * gpus / 3600.0;
  p.usd = p.gpu_hours * cluster.usd_per_gpu_hour;
  return p;
}

std::vector<Plan> search_plans(const Config& config, const ClusterSpec& cluster, int64_t gpus, int64_t global_sequences,
                               double tokens, const Assumptions& a) {
  const double global_batch = static_cast<double>(global_sequences);
  std::vector<Plan> plans;
  for (int64_t tp = 1; tp <= cluster.gpus_per_node; tp *= 2) {
    for (int64_t pp = 1; pp <= 64 && tp * pp <= gpus; pp *= 2) {
      if (gpus % (tp * pp) != 0) continue;
      const int64_t dp = gpus / (tp * pp);
      for (int64_t ep = 1; ep <= dp; ep *= 2) {
        for (int64_t mb : {1, 2, 4}) {
          const double micro = global_batch / static_cast<double>(mb * dp);
          if (micro < 1 || micro != std::floor(micro)) continue;
          for (const char* recompute : {"none", "selective", "full"}) {
            Layout l{tp, pp, ep, dp, 1, mb, static_cast<int64_t>(micro), dp > 1, recompute};
            try {
              Plan plan = make_plan(config, cluster, l, tokens, a);
              if (plan.fits) plans.push_back(plan);
            } catch (const ConfigError&) {
              // not a valid layout for this model
            }
          }
        }
      }
    }
  }
  std::sort(plans.begin(), plans.end(), [](const Plan& x, const Plan& y) { return x.usd < y.usd; });
  return plans;
}

}  // namespace fmoe::plan
