#include "trainer/trainer.h"
#include "trainer/trainer_impl.h"

#include "parallel/topology.h"

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
#include <numeric>
#include <optional>
#include <nlohmann/json.hpp>
#include <thread>

#include "common/test_hooks.h"
#include "data/file_util.h"
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
#include "trainer/checkpoint.h"
#include "trainer/metrics.h"
#include "trainer/optimizer.h"
#include "trainer/budget.h"
#include "trainer/precision.h"
#include "trainer/safetensors.h"
#include "trainer/step_readback.h"
#include "trainer/pipeline_stages.h"
#include "trainer/run_device.h"
#include "trainer/step_runtime.h"
#include "trainer/zero1.h"

namespace fmoe::trainer {
namespace {

std::atomic<bool> g_stop_requested{false};

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

// Peak resident set size of this process so far (getrusage's ru_maxrss, in KiB on Linux).
double peak_rss_bytes() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) * 1024.0;
}

int64_t default_threads(int world_size) {
  const int64_t local_ranks = fmoe::trainer::local_ranks(world_size);
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, cores / local_ranks);
}

// {"wait_seconds": [...], "forward_seconds": [...], "backward_seconds": [...], "weight_seconds": [...]},
// one entry per pipeline rank (weight_seconds: the deferred weight gradients of split schedules).
nlohmann::json pipeline_times_json(const at::Tensor& gathered) {
  nlohmann::json wait = nlohmann::json::array(), forward = wait, backward = wait, weight = wait;
  const at::Tensor t = gathered.contiguous();
  const double* v = t.data_ptr<double>();
  for (int64_t r = 0; r < t.numel() / 4; ++r) {
    wait.push_back(v[4 * r]);
    forward.push_back(v[4 * r + 1]);
    backward.push_back(v[4 * r + 2]);
    weight.push_back(v[4 * r + 3]);
  }
  return {{"wait_seconds", wait}, {"forward_seconds", forward}, {"backward_seconds", backward}, {"weight_seconds", weight}};
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

// The first budget limit reached, or empty. A schedule sized by the budget
// (training.steps: 0) runs to its fixed end instead: its limits set its length.
std::string Trainer::Impl::budget_exhausted() const {
  const BudgetConfig& b = config.budget;
  char text[160] = "";
  if (config.training.steps == 0) return text;
  if (b.max_minutes > 0 && state.elapsed_seconds >= b.max_minutes * 60) {
    std::snprintf(text, sizeof(text), "%.4g of budget.max_minutes %.4g minutes", state.elapsed_seconds / 60, b.max_minutes);
  } else if (b.max_tokens > 0 && state.tokens_seen >= b.max_tokens) {
    std::snprintf(text, sizeof(text), "%lld of budget.max_tokens %lld tokens", static_cast<long long>(state.tokens_seen),
                  static_cast<long long>(b.max_tokens));
  } else if (b.max_gpu_hours > 0 && gpu_hours() >= b.max_gpu_hours) {
    std::snprintf(text, sizeof(text), "%.4g of budget.max_gpu_hours %.4g GPU-hours", gpu_hours(), b.max_gpu_hours);
  } else if (b.max_usd > 0 && usd() >= b.max_usd) {
    std::snprintf(text, sizeof(text), "$%.4g of budget.max_usd $%.4g", usd(), b.max_usd);
  }
  return text;
}

// "spent / projected" for the progress line, given the run's total steps.
std::string Trainer::Impl::spend_text(int64_t total_steps) const {
  if (!config.budget.limited() && config.budget.usd_per_gpu_hour <= 0) return "";
  const double projected = state.step > 0 ? gpu_hours() / static_cast<double>(state.step) * static_cast<double>(total_steps) : 0;
  char text[96];
  if (config.budget.usd_per_gpu_hour > 0) {
    std::snprintf(text, sizeof(text), "$%.4g / $%.4g projected", usd(), projected * config.budget.usd_per_gpu_hour);
  } else {
    std::snprintf(text, sizeof(text), "%.3g / %.3g GPU-h projected", gpu_hours(), projected);
  }
  return text;
}


// Measures BF16 and FP32 GEMMs at the run's shapes (or takes injected rates),
// averaged over ranks so that every rank makes the same choice; a resumed
// `auto` run keeps the dtype its checkpoint recorded.
void Trainer::Impl::choose_precision_once() {
  const std::string& requested = config.training.precision;
  const std::optional<GemmRates> injected = injected_gemm_rates(common::test_hooks().gemm_gflops);
  GemmRates rates = injected ? *injected : measure_gemm_rates(run_gemm_shape(config), 0.4, device);
  if (world_size > 1) rates = average_over_ranks(rates, mesh->world());
  const bool kept = requested == "auto" && !state.precision.empty();
  PrecisionChoice choice = choose_precision(kept ? state.precision : requested, rates);
  if (kept) choice.message = "precision auto -> " + state.precision + " (kept from the checkpoint; " + choice.message + ")";
  dtype = choice.dtype;
  state.precision = choice.name;
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
  const bool injected = injected_calibration(common::test_hooks().calibration, step_seconds, eval_seconds);
  in.elapsed_seconds = injected ? step_seconds * static_cast<double>(state.step) + eval_seconds : state.elapsed_seconds;
  in.injected = injected;
  if (injected) injected_measurements.insert("FMOE_CALIBRATION");
  in.step_seconds = step_seconds;
  in.eval_seconds = eval_seconds;
  if (world_size > 1) agree_over_ranks(in, mesh->world());
  in.limit_seconds = budget_seconds(b, world_size);
  in.decided_at_step = state.step;
  in.eval_interval = config.training.eval_interval;
  in.token_limit_steps = b.max_tokens > 0 ? std::max<int64_t>(1, b.max_tokens / tokens_per_step) : 0;
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

TrainResult Trainer::Impl::run() {
  const Config& cfg = config;
  const TrainingConfig& tc = cfg.training;
  if (options.world) {
    rank = options.world->rank();
    world_size = options.world->size();
  }
  if (const std::string error = cfg.model.trainer_support(); !error.empty()) throw ConfigError("model." + error);
  if (const std::string error = cfg.parallel.trainer_support(); !error.empty()) throw ConfigError("parallel." + error);
  // Ranks that disagree on the config would issue mismatched collectives: refuse at once.
  if (options.world && world_size > 1) {
    const uint32_t crc = data::crc32_of(to_yaml(cfg));
    at::Tensor mine = at::full({1}, static_cast<int64_t>(crc), at::kLong);
    at::Tensor all = at::empty({world_size}, at::kLong);
    options.world->all_gather(all, mine, {})->wait();
    for (int r = 1; r < world_size; ++r) {
      if (all[r].item<int64_t>() != all[0].item<int64_t>()) {
        throw ConfigError("ranks disagree on the config: rank " + std::to_string(r) +
                          "'s resolved config differs from rank 0's (same --config and --set on every rank)");
      }
    }
  }
  const RunDevice run_device = setup_device(cfg);
  device = run_device.device;
  log(run_device.message);
  // The mesh: dp x pp x tp = world, ep carved out of dp.
  if (world_size % (cfg.parallel.tp * cfg.parallel.pp) != 0) {
    throw ConfigError("parallel.tp: tp x pp = " + std::to_string(cfg.parallel.tp * cfg.parallel.pp) + " does not divide the " +
                      std::to_string(world_size) + " ranks launched");
  }
  parallel::MeshShape shape;
  shape.tp = cfg.parallel.tp;
  shape.pp = cfg.parallel.pp;
  shape.ep = cfg.parallel.ep;
  shape.dp = cfg.parallel.dp > 0 ? cfg.parallel.dp : world_size / std::max<int64_t>(1, shape.tp * shape.pp);
  if (const std::string why = shape.validate(world_size); !why.empty()) {
    throw ConfigError("parallel." + why + " (launched " + std::to_string(world_size) + " ranks; dp x pp x tp must equal it)");
  }
  if (options.world) {
    options.world->set_default_timeout(std::chrono::milliseconds(static_cast<int64_t>(cfg.parallel.timeout_s * 1000)));
    // Non-owning: the caller keeps the world communicator alive for the run.
    std::shared_ptr<parallel::Communicator> world(options.world, [](parallel::Communicator*) {});
    if (device.is_cuda()) {
      std::string message;
      world = device_world(world, cfg, world_size, &message);
      log(message);
    } else if (common::test_hooks().host_staging) {
      // Tests: a CPU run through the staging layer that carries CUDA tensors over MPI.
      world = parallel::with_host_staging(world, /*always=*/true);
      log("communication: MPI through host buffers (FMOE_HOST_STAGING=1)");
    }
    mesh.emplace(world, shape);
    // Where the mesh's groups fall on the nodes.
    const std::vector<std::string> node_of_rank = parallel::node_names(*options.world);
    for (const std::string& line : parallel::describe_placement(shape, node_of_rank)) log(line);
    const auto& m = cfg.model;
    if (shape.ep > 1 && m.num_groups > 1 && m.num_experts % m.num_groups == 0 && m.num_experts % shape.ep == 0) {
      const int nodes = parallel::max_nodes_per_token(shape, node_of_rank, static_cast<int>(m.num_experts), static_cast<int>(m.num_groups),
                                                       static_cast<int>(m.group_top_k));
      log("routing: group_top_k " + std::to_string(m.group_top_k) + " of " + std::to_string(m.num_groups) +
          " expert groups: a token's experts sit on at most " + std::to_string(nodes) + " node" + (nodes > 1 ? "s" : ""));
    }
  } else {
    mesh.emplace(parallel::Mesh::single());
  }
  dp_size = shape.dp;
  dp_rank = mesh->coords().dp;
  const bool use_zero1 = cfg.parallel.zero1 && shape.dp > 1;
  sharded_model = shape.tp > 1 || shape.ep > 1;
  sharded_state = sharded_model || use_zero1 || shape.pp > 1;
  const int64_t threads = tc.threads > 0 ? tc.threads : default_threads(world_size);
  at::set_num_threads(static_cast<int>(threads));
  log("moe-train: " + std::to_string(world_size) + " rank" + (world_size > 1 ? "s" : "") + " x " + std::to_string(threads) +
      " thread" + (threads > 1 ? "s" : "") + "; building the model, then timing BF16 and FP32 GEMMs (about a second)");

  // Every rank draws the same initial parameters from the shared seed and keeps its shard.
  torch::manual_seed(static_cast<uint64_t>(tc.seed));
  moe::Parallelism parallelism{*mesh,
                               cfg.parallel.expert_dispatcher == "allgather" ? moe::ExpertDispatcher::kAllGather
                                                                             : moe::ExpertDispatcher::kAllToAll,
                               cfg.parallel.sequence_parallel};
  try {
    model = std::make_shared<moe::MoEModel>(cfg.model, parallelism);
  } catch (const std::invalid_argument& e) {
    throw ConfigError(e.what());
  }
  // Drawn on the CPU from the seed, then moved: a GPU run starts from the CPU run's weights.
  model->to(device);
  // Under pipelining every rank builds the whole model from the seed and trains the
  // parameters of its stages; the others are brought up to date (a broadcast from
  // their owner) before validation and checkpoints.
  stages = std::make_unique<PipelineStages>(cfg, shape);
  std::vector<at::Tensor> dense, experts;
  for (const auto& item : model->named_parameters()) {
    if (stages->owner_of(item.key()) != mesh->coords().pp) continue;
    params.push_back({item.key(), item.value()});
    const parallel::ShardSpec& spec = model->shard_specs().at(item.key());
    (spec.is_expert() ? experts : dense).push_back(item.value());
    if (spec.tp_partial_grad) tp_partial.push_back(item.value());
    sharded_over_tp.push_back(spec.tp_dim >= 0);
    is_expert.push_back(spec.is_expert());
  }
  if (use_zero1) {
    zero1 = std::make_unique<Zero1>(params, sharded_over_tp, is_expert, *mesh, cfg.optimizer);
  } else {
    grad_sync = std::make_unique<parallel::GradientSync>(dense, experts, *mesh, static_cast<int64_t>(cfg.parallel.bucket_mb * (1 << 20)));
    grad_sync->enable_overlap(/*deferred=*/tp_partial);
    optimizer = std::make_unique<AdamW>(params, cfg.optimizer);
  }

  // A rank keeps only its stages' weights (other stages' come back for checkpoints).
  stages->release_foreign(*model, static_cast<int>(mesh->coords().pp));
  std::string pipeline_message;
  step_runtime = std::make_unique<StepRuntime>(stages->make_runtime(*model, cfg, *mesh, device, &pipeline_message));
  if (!pipeline_message.empty()) log(pipeline_message);

  const auto dataset = data::IndexedDataset::open(cfg.data.prefix);
  if (dataset->vocab_size() > cfg.model.vocab_size) {
    throw ConfigError("data.prefix: " + cfg.data.prefix + " was tokenized with " + std::to_string(dataset->vocab_size()) +
                      " tokens, more than model.vocab_size " + std::to_string(cfg.model.vocab_size));
  }
  data::LoaderOptions loader_options;
  loader_options.seq_len = tc.seq_len;
  loader_options.micro_batch_size = tc.micro_batch_size;
  loader_options.num_micro_batches = tc.grad_accum_steps;
  loader_options.dp_size = dp_size;
  loader_options.seed = static_cast<uint64_t>(tc.seed);
  loader_options.val_fraction = cfg.data.val_fraction;
  loader_options.split_seed = static_cast<uint64_t>(cfg.data.split_seed);
  loader = std::make_unique<data::TokenLoader>(dataset, loader_options);
  state.loader_seed = loader_options.seed;

  if (options.resume || options.eval_only) {
    const bool explicit_path = !options.resume_path.empty();
    const std::vector<std::string> candidates = explicit_path ? std::vector<std::string>{options.resume_path} : resume_candidates(tc.run_dir);
    if (candidates.empty()) {
      throw std::runtime_error(tc.run_dir + "/checkpoints: no checkpoint to " + (options.eval_only ? "evaluate" : "resume from") +
                               (options.eval_only ? "" : "; run without --resume"));
    }
    restore_first_usable(candidates, /*fallback=*/!explicit_path);
  } else if (!tc.init_from.empty()) {
    initialize_from(tc.init_from);
  }

  if (options.eval_only) return evaluate_checkpoint();
  if (options.reshard_only) {
    save(cfg);
    finish_saves();
    TrainResult done;
    done.final_step = state.step;
    return done;
  }
  if (rank == 0) {
    std::filesystem::create_directories(tc.run_dir);
    data::write_file_atomic(tc.run_dir + "/config.yaml", to_yaml(cfg));
    metrics = std::make_unique<MetricsWriter>(tc.run_dir + "/metrics.jsonl", options.resume ? state.step : -1);
  }

  const moe::ParameterCounts counts = moe::count_parameters(cfg.model);
  const double flops_per_token = moe::training_flops_per_token(cfg.model, tc.seq_len);
  choose_precision_once();
  const double peak_gflops = peak_gflops_per_rank * world_size;
  const int64_t tokens_per_step = tc.micro_batch_size * tc.seq_len * tc.grad_accum_steps * dp_size;
  char summary[512];
  std::snprintf(summary, sizeof(summary),
                "model: %.2fM parameters, %.2fM activated per token | %.1f MFLOP/token | layout dp=%lld pp=%lld tp=%lld ep=%lld (%s experts) | %lld threads/rank | %s\n"
                "data: %lld train tokens, %lld validation tokens | %lld tokens/step | peak %.0f GFLOP/s (%s GEMM, all ranks%s)",
                counts.total / 1e6, counts.activated / 1e6, flops_per_token / 1e6, static_cast<long long>(shape.dp),
                static_cast<long long>(shape.pp), static_cast<long long>(shape.tp), static_cast<long long>(shape.ep), cfg.parallel.expert_dispatcher.c_str(),
                static_cast<long long>(threads), state.precision.c_str(), static_cast<long long>(loader->train_tokens()),
                static_cast<long long>(loader->val_tokens()), static_cast<long long>(tokens_per_step), peak_gflops,
                state.precision.c_str(), injected_measurements.count("FMOE_GEMM_GFLOPS") ? "; injected, not measured" : "");
  log(summary);
  const StateBytes state_bytes = zero1 ? zero1->bytes_per_parameter() : optimizer->bytes_per_parameter();
  if (zero1) {
    char text[160];
    std::snprintf(text, sizeof(text), "zero1: this rank owns the optimizer state of %.2fM of %.2fM local parameters",
                  zero1->owned_numel() / 1e6, static_cast<double>(std::accumulate(params.begin(), params.end(), int64_t{0},
                      [](int64_t n, const NamedParameter& p) { return n + p.tensor.numel(); })) / 1e6);
    log(text);
  }
  log("memory per parameter: " + state_bytes.format() + " (master " + cfg.optimizer.main_params_dtype + ", grads " +
      cfg.optimizer.grad_dtype + ", exp_avg " + cfg.optimizer.exp_avg_dtype + ", exp_avg_sq " + cfg.optimizer.exp_avg_sq_dtype + ")");
  if (cfg.precision.fp8) log("fp8 GEMMs: " + fp8::fp8_gemm_backend(device));

  const BudgetConfig& budget = cfg.budget;
  if (tc.eval_sequences > loader->num_val_windows()) {
    log("validation: training.eval_sequences " + std::to_string(tc.eval_sequences) + " exceeds the " +
        std::to_string(loader->num_val_windows()) + " held-out windows; evaluating all of them");
  }
  if (!length_known() && !budget.limited_in_time()) fix_schedule(0, 0, tokens_per_step);
  if (tc.steps > 0 && budget.max_tokens > 0 && budget.max_tokens < tc.steps * tokens_per_step) {
    log("budget warning: " + std::to_string(tc.steps * tokens_per_step) + " tokens planned, budget.max_tokens is " +
        std::to_string(budget.max_tokens) + ": the run will stop near step " + std::to_string(budget.max_tokens / tokens_per_step));
  }
  bool projection_warned = false;
  if (const std::string spent = budget_exhausted(); !spent.empty()) {
    log("budget already spent at step " + std::to_string(state.step) + ": " + spent + "; raise the budget to continue");
    TrainResult done;
    done.final_step = state.step;
    done.stopped_early = true;
    return done;
  }

  TrainResult result;
  const bool interactive = rank == 0 && isatty(STDERR_FILENO);
  auto last_progress = Clock::now();  // a line at least every 10 s, whatever log_interval says
  const auto moe_layers = model->moe_layers();
  double train_seconds = 0;
  int64_t timed_tokens = 0;

  // Test hook: FMOE_STALL_RANK=r FMOE_STALL_AT_STEP=s makes rank r stop taking
  // part at step s (it sleeps), to prove that its peers give up within the
  // collective timeout instead of hanging.
  const common::TestHooks& test_hooks = common::test_hooks();
  // Test hook: FMOE_DUMP_GRADIENTS=dir writes each rank's reduced gradients of the
  // first step (before clipping) to dir/gradients_rank<r>.safetensors.

  std::vector<double> timed_steps;  // step times of this invocation until a budget-sized schedule is fixed

  StepReadback readback;
  StepTimer timer(device);
  parallel::reset_peak_device_memory(device);
  for (int64_t step = state.step; step < total_steps(); ++step) {
    if (test_hooks.stall_rank == rank && step == test_hooks.stall_at_step) std::this_thread::sleep_for(std::chrono::hours(1));
    const auto step_start = Clock::now();
    timer.start();
    const int64_t copies_before = StepReadback::copies();
    const double pipeline_wait_start = mesh->pp().wait_seconds();
    const double comm_start = communication_seconds();
    // The micro-batches' forwards and backwards: this rank's schedule for the step.
    StepHooks hooks;
    hooks.batch = [&](int64_t micro) { return to_device(loader->train_batch(step, micro, dp_rank)); };
    hooks.before_backward = [&](bool last) {
      if (grad_sync) grad_sync->arm(/*last_micro_batch=*/last);
    };
    const StepTotals totals = step_runtime->run(hooks, dtype, cfg.precision.fp8);
    const double data_seconds = totals.data_seconds;
    const double pipeline_wait = mesh->pp().wait_seconds() - pipeline_wait_start;
    // ce, aux, z summed over micro-batches, on the device: read with the step's other scalars.
    at::Tensor losses = totals.losses;
    // Before a budget-sized schedule is fixed the steps are in warmup, where the rate ignores the length.
    const double lr = learning_rate(cfg.optimizer, step, length_known() ? total_steps() : step + 1);
    at::Tensor grad_norm;
    const auto optimizer_start = Clock::now();
    const double optimizer_comm_start = communication_seconds();
    parallel::sum_partial_gradients_over_tp(tp_partial, *mesh);
    if (zero1) {
      zero1->reduce_scatter_gradients();
      zero1->quantize_gradients();
      grad_norm = zero1->clip_grad_norm(cfg.optimizer.grad_clip);
      zero1->step(lr);
    } else {
      grad_sync->sync();
      optimizer->quantize_gradients();
      std::vector<at::Tensor> grads;
      for (const auto& p : params) grads.push_back(p.tensor.grad());
      if (!test_hooks.dump_gradients.empty() && step == 0) {
        TensorMap dumped;
        for (const auto& p : params) {
          if (p.tensor.grad().defined()) dumped[p.name] = p.tensor.grad().to(at::kCPU);
        }
        write_safetensors(test_hooks.dump_gradients + "/gradients_rank" + std::to_string(rank) + ".safetensors", dumped);
      }
      grad_norm = clip_grad_norm(grads, sharded_over_tp, is_expert, *mesh, cfg.optimizer.grad_clip);
      optimizer->step(lr);
    }
    // Step-time breakdown: data, communication this rank waited on, optimizer, and the rest (compute).
    const double optimizer_seconds = seconds_since(optimizer_start) - (communication_seconds() - optimizer_comm_start);
    model->zero_grad(/*set_to_none=*/true);

    std::vector<at::Tensor> loads;
    for (const auto& layer : moe_layers) {
      at::Tensor load = layer->step_load.clone();
      // Over the pipeline too: every rank then updates every layer's bias alike.
      sum_over_pipeline(load);
      sum_over_ranks(load);
      loads.push_back(load);
    }
    model->update_expert_biases(loads);

    sum_over_pipeline(losses);  // each stage's share
    sum_over_ranks(losses);
    losses /= static_cast<double>(tc.grad_accum_steps * dp_size);
    // The step's one device-to-host copy: losses, gradient norm, per-layer max and mean expert load.
    timer.stop();
    readback.add(losses);
    readback.add(grad_norm);
    for (const auto& load : loads) readback.add(at::stack({load.max().to(at::kDouble), load.to(at::kDouble).mean()}));
    const std::vector<double> scalars = readback.read();
    const size_t mtp_depth = static_cast<size_t>(cfg.model.mtp_depth);
    const double loss = scalars[0], grad_norm_value = scalars[3 + mtp_depth];
    state.step = step + 1;
    state.tokens_seen += tokens_per_step;
    const double step_seconds = device.is_cpu() ? seconds_since(step_start) : timer.seconds();
    const double comm_seconds = communication_seconds() - comm_start;
    train_seconds += step_seconds;
    timed_tokens += tokens_per_step;
    if (!length_known()) timed_steps.push_back(step_seconds);

    StepRecord record{state.step, loss, -1};
    bool last = state.step == total_steps();
    // A budget-sized schedule is fixed after its calibration steps, from their
    // mean time (the first two of this process warm caches up) and one timed validation pass.
    const bool deciding = !length_known() && state.step >= budget.calibration_steps;
    double eval_seconds = 0;
    if ((tc.eval_interval > 0 && state.step % tc.eval_interval == 0) || last || deciding) {
      // A pass can take tens of seconds on a slow CPU: say so before it starts.
      if (rank == 0 && !interactive) {
        std::fprintf(stderr, "eval step %lld: validating on %lld held-out sequences\n", static_cast<long long>(state.step),
                     static_cast<long long>(eval_windows()));
      }
      const auto eval_start = Clock::now();
      record.val_loss = evaluate();
      eval_seconds = seconds_since(eval_start);
    }
    // Spend counts the whole iteration (step and evaluation) and carries over on resume.
    state.elapsed_seconds += seconds_since(step_start);
    if (deciding) {
      const size_t skip = timed_steps.size() > 2 ? 2 : 0;
      const double mean = std::accumulate(timed_steps.begin() + static_cast<long>(skip), timed_steps.end(), 0.0) /
                          static_cast<double>(timed_steps.size() - skip);
      fix_schedule(mean, eval_seconds, tokens_per_step);
      last = state.step == total_steps();
    }
    if (!projection_warned && tc.steps > 0 && (budget.max_gpu_hours > 0 || budget.max_usd > 0)) {
      const double projected = gpu_hours() / static_cast<double>(state.step) * static_cast<double>(tc.steps);
      if ((budget.max_gpu_hours > 0 && projected > budget.max_gpu_hours) ||
          (budget.max_usd > 0 && projected * budget.usd_per_gpu_hour > budget.max_usd)) {
        char text[200];
        std::snprintf(text, sizeof(text), "budget warning: projected %.4g GPU-hours ($%.4g) for %lld steps exceeds the budget",
                      projected, projected * budget.usd_per_gpu_hour, static_cast<long long>(tc.steps));
        log(text);
        projection_warned = true;
      }
    }

    // Each pipeline rank's blocked, forward, backward and weight-gradient time, gathered (host values) for rank 0's metrics.
    at::Tensor pipeline_ranks;
    if (shape.pp > 1) {
      const at::Tensor mine = at::tensor({pipeline_wait, totals.forward_seconds, totals.backward_seconds, totals.weight_seconds}, at::kDouble);
      pipeline_ranks = at::empty({shape.pp * 4}, at::kDouble);
      mesh->pp().all_gather(pipeline_ranks, mine, {})->wait();
    }
    const double tokens_per_second = timed_tokens / train_seconds;
    const double mfu = flops_per_token * tokens_per_second / (peak_gflops * 1e9);
    if (rank == 0) {
      nlohmann::json line = {{"step", state.step}, {"loss", loss}, {"aux_loss", scalars[1]},
                             {"z_loss", scalars[2]}, {"lr", lr}, {"grad_norm", grad_norm_value},
                             {"tokens_seen", state.tokens_seen}, {"tokens_per_second", tokens_per_step / step_seconds},
                             {"mfu", flops_per_token * tokens_per_step / step_seconds / (peak_gflops * 1e9)},
                             {"step_seconds", step_seconds}, {"gpu_hours", gpu_hours()},
                             {"time", {{"data", data_seconds}, {"communication", comm_seconds}, {"optimizer", optimizer_seconds},
                                       {"compute", step_seconds - data_seconds - comm_seconds - optimizer_seconds}}},
                             {"peak_rss_bytes", peak_rss_bytes()}, {"precision", state.precision},
                             {"device", device.str()},
                             {"device_to_host_copies", StepReadback::copies() - copies_before},
                             {"injected", injected_measurements}};
      if (device.is_cuda()) line["peak_device_memory_bytes"] = parallel::peak_device_memory_bytes(device);
      // The measured bubble: this rank's time blocked on the pipeline's sends and receives.
      if (shape.pp > 1) {
        line["pipeline_wait_seconds"] = pipeline_wait;
        line["pipeline"] = pipeline_times_json(pipeline_ranks);
      }
      if (deciding) {
        line["schedule"] = {{"total_steps", state.total_steps}, {"decided_at_step", state.step},
                            {"step_seconds", state.calibrated_step_seconds}, {"eval_seconds", state.calibrated_eval_seconds},
                            {"limit_seconds", budget_seconds(budget, world_size)}};
      }
      if (budget.usd_per_gpu_hour > 0) line["usd"] = usd();
      if (record.val_loss >= 0) line["val_loss"] = record.val_loss;
      if (mtp_depth > 0) line["mtp_loss"] = std::vector<double>(scalars.begin() + 3, scalars.begin() + 3 + static_cast<long>(mtp_depth));
      nlohmann::json max_load = nlohmann::json::array(), mean_load = nlohmann::json::array();
      for (size_t i = 0; i < loads.size(); ++i) {
        max_load.push_back(scalars[4 + mtp_depth + 2 * i]);
        mean_load.push_back(scalars[5 + mtp_depth + 2 * i]);
      }
      line["state_bytes_per_param"] = state_bytes.training_state();
      line["memory_bytes_per_param"] = {{"weights", state_bytes.weights},       {"master", state_bytes.master},
                                        {"grads", state_bytes.grads},           {"exp_avg", state_bytes.exp_avg},
                                        {"exp_avg_sq", state_bytes.exp_avg_sq}};
      line["expert_load_max"] = max_load;
      line["expert_load_mean"] = mean_load;
      metrics->write(line.dump());

      const int64_t total = length_known() ? total_steps() : 0;
      ProgressLine progress{state.step, total, loss, lr, tokens_per_second, mfu,
                            (total - state.step) * train_seconds / std::max<int64_t>(1, timed_tokens / tokens_per_step),
                            total > 0 ? spend_text(total) : ""};
      if (interactive) {
        std::fprintf(stderr, "\r%s", progress.format().c_str());
        if (last) std::fprintf(stderr, "\n");
      } else if (state.step % tc.log_interval == 0 || last || seconds_since(last_progress) >= 10) {
        std::fprintf(stderr, "%s\n", progress.format().c_str());
        last_progress = Clock::now();
      }
      if (record.val_loss >= 0) {
        if (interactive) std::fprintf(stderr, "\n");
        char text[128];
        std::snprintf(text, sizeof(text), "eval step %lld: val_loss %.4f", static_cast<long long>(state.step), record.val_loss);
        log(text);
      }
    }
    result.steps.push_back(record);
    if (record.val_loss >= 0) result.final_val_loss = record.val_loss;

    // Every rank must agree to stop, or the next collective would hang.
    const std::string exhausted = budget_exhausted();
    const bool stop_here = g_stop_requested.load() || (options.stop_at_step > 0 && state.step >= options.stop_at_step);
    // Stop flags (request: 1, budget: 2) agree across ranks, or a collective would hang.
    at::Tensor stop = at::full({2}, 0L, at::kLong);
    stop[0] = stop_here ? 1L : 0L;
    stop[1] = exhausted.empty() ? 0L : 1L;
    sum_over_world(stop);
    const bool stopping = stop[0].item<int64_t>() > 0 || stop[1].item<int64_t>() > 0;
    const bool interval_save = tc.checkpoint_interval > 0 && state.step % tc.checkpoint_interval == 0;
    if (last ? tc.checkpoint_at_end : stopping || interval_save) {
      const auto save_start = Clock::now();
      save(cfg);
      state.elapsed_seconds += seconds_since(save_start);  // the budget's clock counts checkpoint writes too
    }
    if (stopping && !last) {
      if (stop[1].item<int64_t>() > 0) {
        char text[320];
        std::snprintf(text, sizeof(text),
                      "budget reached at step %lld: spent %s (%.4g GPU-hours, %lld tokens); checkpoint saved; raise the "
                      "budget and run with --resume to continue",
                      static_cast<long long>(state.step), exhausted.empty() ? "the limit on another rank" : exhausted.c_str(),
                      gpu_hours(), static_cast<long long>(state.tokens_seen));
        log(text);
      } else {
        log("stopped at step " + std::to_string(state.step) + " on request; resume with --resume");
      }
      result.stopped_early = true;
      break;
    }
  }
  finish_saves();  // the last checkpoint is durable before the run reports done
  result.final_step = state.step;
  // The largest rank's peak: what each machine must hold per rank.
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
