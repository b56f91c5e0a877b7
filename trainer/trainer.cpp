#include "trainer/trainer.h"
#include "trainer/trainer_impl.h"

#include <ATen/ATen.h>
#include <torch/torch.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/test_hooks.h"
#include "common/timing.h"
#include "common/file_util.h"
#include "fp8/fp8_gemm.h"
#include "data/loader.h"
#include "moe/model.h"
#include "moe/stage_split.h"
#include "parallel/communicator.h"
#include "parallel/device.h"
#include "parallel/device_communicators.h"
#include "parallel/grad_sync.h"
#include "parallel/mesh.h"
#include "parallel/tensor_parallel.h"
#include "checkpoint/checkpoint.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/budget.h"
#include "trainer/precision.h"
#include "checkpoint/safetensors.h"
#include "trainer/step_readback.h"
#include "trainer/pipeline_stages.h"
#include "trainer/run_device.h"
#include "trainer/step_runtime.h"
#include "trainer/zero1.h"

namespace fmoe::trainer {

using config::Config;
using config::TrainingConfig;
using config::BudgetConfig;
using checkpoint::TensorMap;
using checkpoint::write_safetensors;
using common::Clock;
using common::seconds_since;
namespace {

std::atomic<bool> g_stop_requested{false};


// Peak resident set size of this process so far (getrusage's ru_maxrss, in KiB on Linux).
double peak_rss_bytes() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024.0;
}

// {"wait_seconds": [...], "forward_seconds": [...], "backward_seconds": [...], "weight_seconds": [...],
// "overlapped_seconds": [...]}, one entry per pipeline rank (weight_seconds: the deferred weight gradients
// of split schedules; overlapped_seconds: how long DualPipeV's F&B pairs ran both halves at once).
nlohmann::json pipeline_times_json(const at::Tensor& gathered) {
  const char* names[] = {"wait_seconds", "forward_seconds", "backward_seconds", "weight_seconds", "overlapped_seconds"};
  constexpr int64_t kFields = 5;
  nlohmann::json out = nlohmann::json::object();
  const at::Tensor t = gathered.contiguous();
  const double* v = t.data_ptr<double>();
  for (int64_t f = 0; f < kFields; ++f) {
    nlohmann::json values = nlohmann::json::array();
    for (int64_t r = 0; r < t.numel() / kFields; ++r) values.push_back(v[kFields * r + f]);
    out[names[f]] = values;
  }
  return out;
}

}  // namespace

void request_stop() { g_stop_requested.store(true); }

// The validation loss over a fixed set of held-out windows (the first
// eval_sequences of the validation stream), dealt out over the data-parallel
// ranks in contiguous slices: the same number on every layout and machine.
double Trainer::Impl::evaluate() {
  torch::NoGradGuard no_grad;
  const int64_t total = eval_windows();
  const int64_t begin = dp_rank * total / dp_size, end = (dp_rank + 1) * total / dp_size;
  const int64_t rows_per_batch = config.training.micro_batch_size;
  at::Tensor sums = at::zeros({2}, at::TensorOptions().dtype(at::kDouble).device(device));  // summed per-window mean losses, windows
  std::vector<at::Tensor> batches;
  std::vector<int64_t> counted_rows;  // 0 for a batch that is run but not counted
  const auto run = [&](int64_t first, int64_t rows, bool counted) {
    batches.push_back(to_device(loader->val_windows(first, rows)));
    counted_rows.push_back(counted ? rows : 0);
  };
  // Full micro-batches while every rank has one left (slices differ by at most one window).
  const int64_t full_rounds = total / dp_size / rows_per_batch;
  for (int64_t round = 0; round < full_rounds; ++round) run(begin + round * rows_per_batch, rows_per_batch, true);
  const int64_t tail = begin + full_rounds * rows_per_batch;
  if (!sharded_model) {
    if (end > tail) run(tail, end - tail, true);
  } else {
    // Every forward is collective under expert or tensor parallelism, and the
    // expert exchange wants equal row counts: the rest goes one window per
    // forward, as many as the largest slice needs; a rank whose slice is done
    // runs a window it does not count.
    const int64_t largest = (total + dp_size - 1) / dp_size;
    for (int64_t i = tail; i < begin + largest; ++i) run(i < end ? i : begin, 1, i < end);
  }
  // Through the pipeline when there is one: the losses arrive on the head's rank.
  const std::vector<at::Tensor> losses = step_runtime->forward_only(batches, dtype, config.precision.fp8);
  for (size_t i = 0; i < batches.size(); ++i) {
    if (counted_rows[i] == 0 || !losses[i].defined()) continue;
    sums[0] += losses[i].to(at::kDouble) * static_cast<double>(counted_rows[i]);
    sums[1] += static_cast<double>(counted_rows[i]);
  }
  sum_over_pipeline(sums);
  sum_over_ranks(sums);
  for (const auto& layer : model->moe_layers()) layer->step_load.zero_();
  return (sums[0] / sums[1]).item<double>();
}

// Measures BF16 and FP32 GEMMs at the run's shapes (or takes injected rates),
// averaged over ranks so that every rank makes the same choice; a resumed
// `auto` run keeps the dtype its checkpoint recorded.
void Trainer::Impl::choose_precision_once() {
  const std::string& requested = config.training.precision;
  const std::optional<GemmRates> injected = injected_gemm_rates(options.hooks.gemm_gflops);
  GemmRates rates = injected ? *injected : measure_gemm_rates(run_gemm_shape(config), 0.4, device);
  if (world_size > 1) rates = average_over_ranks(rates, mesh->world());
  const bool kept = requested == "auto" && !state.precision.empty();
  PrecisionChoice choice = choose_precision(kept ? state.precision : requested, rates);
  if (kept) choice.message = "precision auto -> " + state.precision + " (kept from the checkpoint; " + choice.message + ")";
  dtype = choice.dtype;
  state.precision = choice.name;
  // Muon's Newton-Schulz GEMMs take the run's GEMM dtype: BF16 only where it measured faster.
  if (optimizer) optimizer->set_matrix_dtype(dtype);
  if (zero1) zero1->set_matrix_dtype(dtype);
  log(choice.message);
  peak_gflops_per_rank =
      injected ? (dtype == at::kBFloat16 ? rates.bf16_gflops : rates.fp32_gflops) : measure_peak_gflops(dtype, 0.6, device);
  if (injected) injected_measurements.insert("FMOE_GEMM_GFLOPS");
}

// Fixes a budget-sized schedule's length once, from the measured times (or
// FMOE_CALIBRATION's), and says how it was decided.
void Trainer::Impl::fix_schedule(double step_seconds, double eval_seconds, int64_t tokens_per_step) {
  const BudgetConfig& b = config.budget;
  ScheduleInputs in;
  // Injected times (tests) stand for the clock too, so the decision is reproducible.
  const bool injected = injected_calibration(options.hooks.calibration, step_seconds, eval_seconds);
  in.elapsed_seconds = injected ? step_seconds * static_cast<double>(state.step) + eval_seconds : state.elapsed_seconds;
  in.injected = injected;
  if (injected) injected_measurements.insert("FMOE_CALIBRATION");
  in.step_seconds = step_seconds;
  in.eval_seconds = eval_seconds;
  if (world_size > 1) agree_over_ranks(in, mesh->world());
  in.limit_seconds = budget_seconds(b, world_size);
  in.decided_at_step = state.step;
  in.eval_interval = config.training.eval_interval;
  in.token_limit_steps = token_limit_steps(b, tokens_per_step);
  state.total_steps = size_schedule(in);
  state.calibrated_step_seconds = in.step_seconds;
  state.calibrated_eval_seconds = in.eval_seconds;
  log(describe_schedule(in, state.total_steps, b.max_tokens, tokens_per_step));
}

// --eval-only: validation of a checkpoint's weights under this run's layout; nothing is written.
TrainResult Trainer::Impl::evaluate_checkpoint() {
  choose_precision_once();
  TrainResult result;
  result.final_step = state.step;
  result.final_val_loss = evaluate();
  char text[128];
  std::snprintf(text, sizeof(text), "eval step %lld: val_loss %.7f (%lld held-out sequences, layout %s)",
                static_cast<long long>(state.step), result.final_val_loss, static_cast<long long>(eval_windows()),
                layout_name().c_str());
  log(text);
  return result;
}

Trainer::Trainer(Config config, TrainerOptions options) : impl_(std::make_unique<Impl>()) {
  impl_->config = std::move(config);
  impl_->options = options;
}

Trainer::~Trainer() = default;

TrainResult Trainer::run() { return impl_->run(); }

// The run's outline: set up, then steps until the schedule ends or every rank
// agrees to stop; each step is trained, validated when due, reported, and saved when due.
TrainResult Trainer::Impl::run() {
  check_config();
  setup_mesh();
  build_model();
  open_data();
  restore_or_initialize();
  if (options.eval_only) return evaluate_checkpoint();
  if (options.reshard_only) return reshard();
  const RunFigures figures = start_outputs();
  if (const std::string spent = budget_exhausted(config.budget, spend(), sized_by_budget()); !spent.empty()) {
    log("budget already spent at step " + std::to_string(state.step) + ": " + spent + "; raise the budget to continue");
    TrainResult done;
    done.final_step = state.step;
    done.stopped_early = true;
    return done;
  }

  if (options.hooks.slow_from_step >= 0) {
    const int64_t until = options.hooks.slow_until_step;
    char text[200];
    std::snprintf(text, sizeof(text), "test hook: every step from %lld %s sleeps %.3f s more (FMOE_SLOW_STEPS)",
                  static_cast<long long>(options.hooks.slow_from_step),
                  until >= 0 ? ("to " + std::to_string(until - 1)).c_str() : "on", options.hooks.slow_step_seconds);
    log(text);
  }
  TrainResult result;
  LoopState loop(device);
  loop.token_limit_steps = token_limit_steps(config.budget, figures.tokens_per_step);
  parallel::reset_peak_device_memory(device);
  for (int64_t step = state.step; step < total_steps(); ++step) {
    StepOutcome outcome = train_step(step, figures, loop);
    bool last = state.step == total_steps();
    // A budget-sized schedule is fixed after its calibration steps, from their
    // mean time and one timed validation pass.
    const bool deciding = !length_known() && state.step >= config.budget.calibration_steps;
    const double eval_seconds = validate_if_due(outcome, last || deciding);
    // Spend counts the whole iteration (step and evaluation) and carries over on resume.
    state.elapsed_seconds += seconds_since(outcome.start);
    if (deciding) {
      fix_schedule(calibrated_step_seconds(loop.timed_steps), eval_seconds, figures.tokens_per_step);
      last = state.step == total_steps();
    }
    if (!loop.projection_warned) {
      const std::string warning = projection_warning(config.budget, spend(), state.step, config.training.steps);
      if (!warning.empty()) log(warning);
      loop.projection_warned = !warning.empty();
    }
    report(outcome, figures, loop, deciding, last);
    result.steps.push_back({state.step, outcome.scalars.loss, outcome.val_loss});
    if (outcome.val_loss >= 0) result.final_val_loss = outcome.val_loss;

    // A budget-sized schedule watches its recent step time once fixed (unless
    // its times are injected: then the clock must not change it).
    if (sized_by_budget() && length_known() && !deciding && options.hooks.calibration.empty()) {
      loop.recent_steps.push_back(outcome.step_seconds);
      if (loop.recent_steps.size() > kRecentSteps) loop.recent_steps.erase(loop.recent_steps.begin());
    }
    const StopVotes stop = agree_to_stop(loop);
    save_if_due(last, stop.any());
    if (stop.any() && !last) {
      announce_stop(stop);
      result.stopped_early = true;
      break;
    }
    if (stop.resize && !last) resize_schedule(loop);
  }
  return finish(std::move(result));
}

// One optimizer step: this rank's schedule of micro-batch forwards and
// backwards, gradient reduction, clipping and the update, the router-bias
// update, then the step's one device-to-host copy.
StepOutcome Trainer::Impl::train_step(int64_t step, const RunFigures& figures, LoopState& loop) {
  const common::TestHooks& hooks = options.hooks;
  // FMOE_STALL_RANK / FMOE_STALL_AT_STEP: this rank stops taking part, so its peers' collectives time out.
  if (hooks.stall_rank == rank && step == hooks.stall_at_step) std::this_thread::sleep_for(std::chrono::hours(1));
  StepOutcome out;
  out.start = Clock::now();
  loop.timer.start();
  // FMOE_SLOW_STEPS="S:seconds[:E]": every step from S on (to E) takes that much longer (a machine that slows down).
  if (hooks.slow_from_step >= 0 && step >= hooks.slow_from_step && (hooks.slow_until_step < 0 || step < hooks.slow_until_step)) {
    std::this_thread::sleep_for(std::chrono::duration<double>(hooks.slow_step_seconds));
  }
  const int64_t copies_before = StepReadback::copies();
  const double pipeline_wait_start = mesh->pp().wait_seconds();
  const double expert_wait_start = mesh->ep().wait_seconds();
  const double comm_start = communication_seconds();
  StepHooks step_hooks;
  step_hooks.batch = [&](int64_t micro) { return to_device(loader->train_batch(step, micro, dp_rank)); };
  step_hooks.before_backward = [&](bool last) {
    if (grad_sync) grad_sync->arm(/*last_micro_batch=*/last);
  };
  const StepTotals totals = step_runtime->run(step_hooks, dtype, config.precision.fp8);
  out.data_seconds = totals.data_seconds;
  out.forward_seconds = totals.forward_seconds;
  out.backward_seconds = totals.backward_seconds;
  out.weight_seconds = totals.weight_seconds;
  out.overlapped_seconds = totals.overlapped_seconds;
  out.pipeline_wait = mesh->pp().wait_seconds() - pipeline_wait_start;
  // ce, aux, z summed over micro-batches, on the device: read with the step's other scalars.
  at::Tensor losses = totals.losses;
  // Before a budget-sized schedule is fixed the steps are in warmup, where the rate ignores the length.
  out.lr = learning_rate(config.optimizer, step, length_known() ? total_steps() : step + 1);
  const auto optimizer_start = Clock::now();
  const double optimizer_comm_start = communication_seconds();
  const at::Tensor grad_norm = optimizer_step(step, out.lr);
  if (grad_sync && !zero1) out.buckets_in_backward = grad_sync->launched_in_backward();
  // Step-time breakdown: data, communication this rank waited on, optimizer, and the rest (compute).
  out.optimizer_seconds = seconds_since(optimizer_start) - (communication_seconds() - optimizer_comm_start);
  model->zero_grad(/*set_to_none=*/true);
  const std::vector<at::Tensor> loads = update_expert_biases();
  const at::Tensor logits = clip_attention_logits();

  sum_over_pipeline(losses);  // each stage's share
  sum_over_ranks(losses);
  losses /= static_cast<double>(config.training.grad_accum_steps * dp_size);
  loop.timer.stop();
  loop.readback.add(losses);
  loop.readback.add(grad_norm);
  // Per MoE layer: the busiest expert's tokens, the mean expert's, and the busiest
  // expert-parallel rank's (its contiguous block of experts) over the mean rank's.
  const int64_t ep = mesh->shape().ep;
  for (const auto& load : loads) {
    const at::Tensor tokens = load.to(at::kDouble), per_rank = tokens.view({ep, -1}).sum(1);
    loop.readback.add(at::stack({tokens.max(), tokens.mean(), per_rank.max() / per_rank.mean()}));
  }
  if (logits.defined()) loop.readback.add(logits);
  out.scalars = StepScalars::unpack(loop.readback.read(), static_cast<size_t>(config.model.mtp_depth), loads.size(),
                                    logits.defined() ? static_cast<size_t>(logits.numel() - 1) : 0);
  state.step = step + 1;
  state.tokens_seen += figures.tokens_per_step;
  out.step_seconds = device.is_cpu() ? seconds_since(out.start) : loop.timer.seconds();
  out.comm_seconds = communication_seconds() - comm_start;
  out.expert_wait = mesh->ep().wait_seconds() - expert_wait_start;
  out.device_to_host_copies = StepReadback::copies() - copies_before;
  loop.train_seconds += out.step_seconds;
  loop.timed_tokens += figures.tokens_per_step;
  if (!length_known()) loop.timed_steps.push_back(out.step_seconds);
  return out;
}

// QK-clip, after the update: each of this rank's attention layers' largest
// logit per head over the step's training forwards, the max over the
// data-parallel replicas (so all clip alike); a head above
// optimizer.qk_clip_threshold has its query and key weights scaled so that its
// logits shrink by threshold / logit (moe::Attention::clip_heads), and the
// master copies follow. Returns the layers' maxima and the count of clipped
// heads, over the tensor-parallel group's heads (FP64 on the device, for the
// step's one readback), or undefined when off.
at::Tensor Trainer::Impl::clip_attention_logits() {
  const double threshold = config.optimizer.qk_clip_threshold;
  if (threshold <= 0) return {};
  std::vector<std::shared_ptr<moe::TransformerLayer>> recorded;  // this rank's (its stages')
  std::vector<at::Tensor> maxima;
  for (const auto& layer : model->transformer_layers()) {
    if (!layer->qk_clip().max_logit.defined()) continue;
    recorded.push_back(layer);
    maxima.push_back(layer->qk_clip().max_logit);
  }
  if (recorded.empty()) return {};
  at::Tensor all = at::cat(maxima);
  if (mesh->dp().size() > 1) mesh->dp().all_reduce(all, {parallel::ReduceOp::kMax})->wait();
  const at::Tensor gamma = (threshold / all).clamp_max(1.0);
  std::vector<at::Tensor> per_layer;
  int64_t offset = 0;
  for (const auto& layer : recorded) {
    const int64_t heads = layer->qk_clip().max_logit.numel();
    per_layer.push_back(all.narrow(0, offset, heads).max());
    if (layer->attention) layer->attention->clip_heads(gamma.narrow(0, offset, heads));
    if (layer->mla) layer->mla->clip_heads(gamma.narrow(0, offset, heads));
    for (const at::Tensor& p : (layer->attention ? layer->attention->parameters() : layer->mla->parameters())) {
      if (zero1) zero1->refresh_master(p);
      if (optimizer) optimizer->refresh_master(p);
    }
    layer->qk_clip().max_logit = at::Tensor();
    offset += heads;
  }
  at::Tensor layer_max = at::stack(per_layer);
  at::Tensor clipped = (all > threshold).sum().to(at::kFloat).reshape({1});
  if (mesh->tp().size() > 1) {
    // Tensor parallelism splits the heads: the metrics give the layer's largest logit and the clipped heads over all of them.
    mesh->tp().all_reduce(layer_max, {parallel::ReduceOp::kMax})->wait();
    mesh->tp().all_reduce(clipped, {parallel::ReduceOp::kSum})->wait();
  }
  return at::cat({layer_max, clipped}).to(at::kDouble);
}

// Reduces the gradients, clips them and updates the weights; returns the
// gradient norm (a device scalar, read with the step's other scalars).
at::Tensor Trainer::Impl::optimizer_step(int64_t step, double lr) {
  parallel::sum_partial_gradients_over_tp(tp_partial, *mesh);
  if (zero1) {
    zero1->reduce_scatter_gradients();
    zero1->quantize_gradients();
    at::Tensor grad_norm = zero1->clip_grad_norm(config.optimizer.grad_clip);
    zero1->step(lr);
    return grad_norm;
  }
  grad_sync->sync();
  optimizer->quantize_gradients();
  std::vector<at::Tensor> grads;
  for (const auto& p : params) grads.push_back(p.tensor.grad());
  // FMOE_DUMP_GRADIENTS=dir: each rank's reduced first-step gradients (before clipping).
  if (const std::string& dir = options.hooks.dump_gradients; !dir.empty() && step == 0) {
    TensorMap dumped;
    for (const auto& p : params) {
      if (p.tensor.grad().defined()) dumped[p.name] = p.tensor.grad().to(at::kCPU);
    }
    write_safetensors(dir + "/gradients_rank" + std::to_string(rank) + ".safetensors", dumped);
  }
  at::Tensor grad_norm = clip_grad_norm(grads, sharded_over_tp, is_expert, *mesh, config.optimizer.grad_clip);
  optimizer->step(lr);
  return grad_norm;
}

// Each MoE layer's expert load of the step, summed over every rank (pipeline
// stages included, so every rank updates every layer's bias alike), applied to
// the routers' biases; returned for the metrics.
std::vector<at::Tensor> Trainer::Impl::update_expert_biases() {
  std::vector<at::Tensor> loads;
  for (const auto& layer : model->moe_layers()) {
    at::Tensor load = layer->step_load.clone();
    sum_over_pipeline(load);
    sum_over_ranks(load);
    loads.push_back(load);
  }
  model->update_expert_biases(loads);
  return loads;
}

// Validation at eval_interval, at the end, and when a budget-sized schedule is
// being fixed; returns its seconds (0 when not run).
double Trainer::Impl::validate_if_due(StepOutcome& outcome, bool forced) {
  const int64_t interval = config.training.eval_interval;
  if (!forced && !(interval > 0 && state.step % interval == 0)) return 0;
  // A pass can take tens of seconds on a slow CPU: say so before it starts.
  if (rank == 0 && !interactive) {
    std::fprintf(stderr, "eval step %lld: validating on %lld held-out sequences\n", static_cast<long long>(state.step),
                 static_cast<long long>(eval_windows()));
  }
  const auto eval_start = Clock::now();
  outcome.val_loss = evaluate();
  return seconds_since(eval_start);
}

// Rank 0's metrics line and progress line (the pipeline ranks' times are gathered by all).
void Trainer::Impl::report(const StepOutcome& out, const RunFigures& figures, LoopState& loop, bool deciding, bool last) {
  const parallel::MeshShape& shape = mesh->shape();
  // Each pipeline rank's blocked, forward, backward, weight-gradient and overlapped time, gathered (host values) for rank 0's metrics.
  at::Tensor pipeline_ranks;
  if (shape.pp > 1) {
    const at::Tensor mine =
        at::tensor({out.pipeline_wait, out.forward_seconds, out.backward_seconds, out.weight_seconds, out.overlapped_seconds}, at::kDouble);
    pipeline_ranks = at::empty({shape.pp * 5}, at::kDouble);
    mesh->pp().all_gather(pipeline_ranks, mine, {})->wait();
  }
  if (rank != 0) return;
  const StepScalars& s = out.scalars;
  const int64_t tokens_per_step = figures.tokens_per_step;
  const double peak_flops = figures.peak_gflops * 1e9;
  nlohmann::json line = {{"step", state.step}, {"loss", s.loss}, {"aux_loss", s.aux_loss},
                         {"z_loss", s.z_loss}, {"lr", out.lr}, {"grad_norm", s.grad_norm},
                         {"tokens_seen", state.tokens_seen}, {"tokens_per_second", tokens_per_step / out.step_seconds},
                         {"mfu", figures.flops_per_token * tokens_per_step / out.step_seconds / peak_flops},
                         {"step_seconds", out.step_seconds}, {"gpu_hours", gpu_hours()},
                         {"time", {{"data", out.data_seconds}, {"communication", out.comm_seconds}, {"optimizer", out.optimizer_seconds},
                                   {"compute", out.step_seconds - out.data_seconds - out.comm_seconds - out.optimizer_seconds}}},
                         {"peak_rss_bytes", peak_rss_bytes()}, {"precision", state.precision},
                         {"device", device.str()},
                         {"device_to_host_copies", out.device_to_host_copies},
                         {"injected", injected_measurements}};
  if (device.is_cuda()) line["peak_device_memory_bytes"] = parallel::peak_device_memory_bytes(device);
  // The measured bubble: this rank's time blocked on the pipeline's sends and receives.
  if (shape.pp > 1) {
    line["pipeline_wait_seconds"] = out.pipeline_wait;
    line["pipeline"] = pipeline_times_json(pipeline_ranks);
  }
  // The expert exchanges' share of the communication (all-to-alls, and the
  // expert-parallel group's part of checkpoints and clipping).
  if (shape.ep > 1) line["expert_wait_seconds"] = out.expert_wait;
  // How many data-parallel gradient buckets started reducing behind the backward.
  if (shape.dp > 1 && out.buckets_in_backward >= 0) {
    line["gradient_buckets"] = {{"total", grad_sync->num_buckets()}, {"launched_in_backward", out.buckets_in_backward}};
  }
  if (deciding) {
    line["schedule"] = {{"total_steps", state.total_steps}, {"decided_at_step", state.step},
                        {"step_seconds", state.calibrated_step_seconds}, {"eval_seconds", state.calibrated_eval_seconds},
                        {"limit_seconds", budget_seconds(config.budget, world_size)}, {"elapsed_seconds", state.elapsed_seconds}};
  }
  if (config.budget.usd_per_gpu_hour > 0) line["usd"] = usd();
  if (out.val_loss >= 0) line["val_loss"] = out.val_loss;
  if (!s.mtp_losses.empty()) line["mtp_loss"] = s.mtp_losses;
  const StateBytes& bytes = figures.state_bytes;
  line["state_bytes_per_param"] = bytes.training_state();
  line["memory_bytes_per_param"] = {{"weights", bytes.weights}, {"master", bytes.master}, {"grads", bytes.grads},
                                    {"exp_avg", bytes.exp_avg}, {"exp_avg_sq", bytes.exp_avg_sq}};
  line["expert_load_max"] = s.load_max;
  line["expert_load_mean"] = s.load_mean;
  // What the planner's moe_imbalance assumes: the expert-parallel ranks wait for the busiest.
  if (shape.ep > 1) line["expert_rank_imbalance"] = s.load_rank_imbalance;
  if (!s.max_logits.empty()) {
    line["max_attention_logit"] = s.max_logits;  // this rank's attention layers, before the clip
    line["qk_clipped_heads"] = s.clipped_heads;
  }
  metrics->write(line.dump());

  const double tokens_per_second = loop.timed_tokens / loop.train_seconds;
  const int64_t total = length_known() ? total_steps() : 0;
  ProgressLine progress{state.step, total, s.loss, out.lr, tokens_per_second,
                        figures.flops_per_token * tokens_per_second / peak_flops,
                        (total - state.step) * loop.train_seconds / std::max<int64_t>(1, loop.timed_tokens / tokens_per_step),
                        total > 0 ? spend_text(config.budget, spend(), state.step, total) : ""};
  if (interactive) {
    std::fprintf(stderr, "\r%s", progress.format().c_str());
    if (last) std::fprintf(stderr, "\n");
  } else if (state.step % config.training.log_interval == 0 || last || seconds_since(loop.last_progress) >= 10) {
    std::fprintf(stderr, "%s\n", progress.format().c_str());
    loop.last_progress = Clock::now();
  }
  if (out.val_loss >= 0) {
    if (interactive) std::fprintf(stderr, "\n");
    char text[128];
    std::snprintf(text, sizeof(text), "eval step %lld: val_loss %.4f", static_cast<long long>(state.step), out.val_loss);
    log(text);
  }
}

// A stop requested on any rank (signal, --stop-at) or a budget reached on any
// rank stops all of them: every rank must agree, or the next collective would hang.
StopVotes Trainer::Impl::agree_to_stop(const LoopState& loop) {
  StopVotes votes;
  votes.exhausted = budget_exhausted(config.budget, spend(), sized_by_budget());
  const bool requested = g_stop_requested.load() || (options.stop_at_step > 0 && state.step >= options.stop_at_step);
  at::Tensor flags = at::full({3}, 0L, at::kLong);
  flags[0] = requested ? 1L : 0L;
  flags[1] = votes.exhausted.empty() ? 0L : 1L;
  flags[2] = schedule_off_course(loop) ? 1L : 0L;
  sum_over_world(flags);
  votes.requested = flags[0].item<int64_t>() > 0;
  votes.budget = flags[1].item<int64_t>() > 0;
  votes.resize = flags[2].item<int64_t>() > 0;
  return votes;
}

ScheduleInputs Trainer::Impl::schedule_now(const LoopState& loop) const {
  ScheduleInputs in;
  in.limit_seconds = budget_seconds(config.budget, world_size);
  in.elapsed_seconds = state.elapsed_seconds;
  in.decided_at_step = state.step;
  in.step_seconds = loop.recent_steps.empty() ? state.calibrated_step_seconds : recent_step_seconds(loop.recent_steps);
  in.eval_seconds = state.calibrated_eval_seconds;
  in.eval_interval = config.training.eval_interval;
  in.token_limit_steps = loop.token_limit_steps;
  return in;
}

bool Trainer::Impl::schedule_off_course(const LoopState& loop) const {
  if (loop.recent_steps.size() < kRecentSteps) return false;  // a full window: one slow step is not a trend
  return resized_schedule(schedule_now(loop), total_steps()) != total_steps();
}

// Some rank projects the fixed schedule past its limit, or well inside it:
// every rank takes the slowest rank's recent step time and elapsed time and
// resizes the schedule alike (the learning-rate decay follows the new length);
// the new length goes into the checkpoints, so a resumed run keeps it.
void Trainer::Impl::resize_schedule(LoopState& loop) {
  ScheduleInputs in = schedule_now(loop);
  if (world_size > 1) agree_over_ranks(in, mesh->world());
  const int64_t before = total_steps();
  const int64_t after = resized_schedule(in, before);
  loop.recent_steps.clear();  // the next decision waits for a fresh window
  if (after == before) return;
  state.total_steps = after;
  char text[320];
  std::snprintf(text, sizeof(text),
                "schedule: %s to %lld steps at step %lld: steps take %.3f s now against %.3f s when the schedule was "
                "fixed, and the %lld planned would end at %.1f s of a %.1f s budget",
                after < before ? "shortened" : "lengthened", static_cast<long long>(after), static_cast<long long>(state.step),
                in.step_seconds, state.calibrated_step_seconds, static_cast<long long>(before), projected_seconds(in, before),
                in.limit_seconds);
  log(text);
}

// At checkpoint_interval, at a stop, and after the last step unless
// training.checkpoint_at_end is false; the budget's clock counts the write.
void Trainer::Impl::save_if_due(bool last, bool stopping) {
  const TrainingConfig& tc = config.training;
  const bool interval_save = tc.checkpoint_interval > 0 && state.step % tc.checkpoint_interval == 0;
  if (!(last ? tc.checkpoint_at_end : stopping || interval_save)) return;
  const auto save_start = Clock::now();
  save(config);
  state.elapsed_seconds += seconds_since(save_start);
}

void Trainer::Impl::announce_stop(const StopVotes& votes) const {
  if (!votes.budget) {
    log("stopped at step " + std::to_string(state.step) + " on request; resume with --resume");
    return;
  }
  char text[320];
  std::snprintf(text, sizeof(text),
                "budget reached at step %lld: spent %s (%.4g GPU-hours, %lld tokens); checkpoint saved; raise the "
                "budget and run with --resume to continue",
                static_cast<long long>(state.step), votes.exhausted.empty() ? "the limit on another rank" : votes.exhausted.c_str(),
                gpu_hours(), static_cast<long long>(state.tokens_seen));
  log(text);
}

// The last save made durable, and the peak memory each machine must hold per rank.
TrainResult Trainer::Impl::finish(TrainResult result) {
  finish_saves();  // the last checkpoint is durable before the run reports done
  result.final_step = state.step;
  at::Tensor rss = at::full({1}, static_cast<int64_t>(peak_rss_bytes()), at::kLong);
  if (world_size > 1) mesh->world().all_reduce(rss, {parallel::ReduceOp::kMax})->wait();
  result.peak_rss_bytes = static_cast<double>(rss.item<int64_t>());
  char text[96];
  std::snprintf(text, sizeof(text), "peak resident memory: %.2f GiB (largest of %d rank%s, getrusage ru_maxrss)",
                result.peak_rss_bytes / (1024.0 * 1024 * 1024), world_size, world_size > 1 ? "s" : "");
  log(text);
  if (device.is_cuda()) {
    std::snprintf(text, sizeof(text), "peak device memory: %.2f GiB on rank %d's %s (LibTorch caching allocator)",
                  static_cast<double>(parallel::peak_device_memory_bytes(device)) / (1024.0 * 1024 * 1024), rank, device.str().c_str());
    log(text);
  }
  return result;
}

}  // namespace fmoe::trainer
