// Trainer::Impl: the state of one run of moe-train and its parts. Internal to
// trainer/ (trainer.cpp holds the loop and validation, trainer_checkpoints.cpp
// saving and restoring); nothing outside includes it.
#pragma once

#include "trainer/trainer.h"

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
#include <set>
#include <nlohmann/json.hpp>
#include <thread>
#include "common/file_util.h"
#include "common/timing.h"
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
using checkpoint::TensorMap;
using checkpoint::TrainerState;
using checkpoint::CheckpointContents;
using checkpoint::CheckpointTensors;
using checkpoint::BackgroundSaver;

// How an optimizer-state entry is split and joined like its parameter (trainer_checkpoints.cpp).
struct StateView {
  std::vector<int64_t> shape;  // the view the parameter's shard spec applies to
  std::vector<int64_t> flat;   // the stored shape to return to (FP8's flat codes and scales); empty: the view
  bool splits = false;         // a whole tensor splits exactly
  bool joins = false;          // shards join exactly
  bool replicated = false;     // every shard holds the whole (FP16's per-tensor scale)
  std::string why;             // when it does not split or join
};

// Figures fixed once training starts, that every step reports against.
struct RunFigures {
  double flops_per_token = 0;
  double peak_gflops = 0;  // all ranks together
  int64_t tokens_per_step = 0;
  StateBytes state_bytes;  // of the training state, per parameter
};

// What one training step measured, as the host sees it after the step's one copy.
struct StepOutcome {
  common::Clock::time_point start;  // the iteration's start: validation and saving count against the budget from here
  StepScalars scalars;
  double lr = 0;
  double step_seconds = 0, data_seconds = 0, comm_seconds = 0, optimizer_seconds = 0;
  double expert_wait = 0;  // blocked in the expert-parallel group's collectives (the dispatch exchanges)
  double pipeline_wait = 0, forward_seconds = 0, backward_seconds = 0, weight_seconds = 0, overlapped_seconds = 0;
  int64_t device_to_host_copies = 0;
  int64_t buckets_in_backward = -1;  // gradient buckets whose reduction started during backward (-1: no bucketed sync)
  double val_loss = -1;  // < 0 when not validated at this step
};

// A budget-sized schedule's drift watch takes the median of this many recent step times.
inline constexpr size_t kRecentSteps = 10;

// What the loop carries from step to step.
struct LoopState {
  explicit LoopState(c10::Device device) : timer(device) {}
  double train_seconds = 0;  // of this invocation's steps
  int64_t timed_tokens = 0;
  std::vector<double> timed_steps;  // step times until a budget-sized schedule is fixed
  std::vector<double> recent_steps; // after it is fixed: the last kRecentSteps step times (drift watch)
  int64_t token_limit_steps = 0;    // budget.max_tokens in steps (0: none): a lengthened schedule stops there
  common::Clock::time_point last_progress = common::Clock::now();  // a progress line at least every 10 s
  bool projection_warned = false;
  StepReadback readback;
  StepTimer timer;
};

// The stop votes of every rank, summed: any one stops all.
struct StopVotes {
  bool requested = false;  // a signal or --stop-at on some rank
  bool budget = false;     // a limit reached on some rank
  bool resize = false;     // a budget-sized schedule projected past its limit, or well inside it, on some rank: resize it
  std::string exhausted;   // this rank's description of the limit reached, or empty
  bool any() const { return requested || budget; }
};

struct Trainer::Impl {
  Config config;
  TrainerOptions options;
  int rank = 0;
  int world_size = 1;
  at::ScalarType dtype = at::kBFloat16;
  c10::Device device{c10::kCPU};
  std::shared_ptr<moe::MoEModel> model;
  std::unique_ptr<data::TokenLoader> loader;
  std::unique_ptr<Optimizer> optimizer;
  std::vector<NamedParameter> params;
  TrainerState state;
  std::optional<parallel::Mesh> mesh;
  std::unique_ptr<parallel::GradientSync> grad_sync;
  std::vector<bool> sharded_over_tp, is_expert;
  std::vector<at::Tensor> tp_partial;  // norm weights under sequence parallelism
  std::unique_ptr<PipelineStages> stages;  // the pipeline split (one stage without pipelining)
  std::unique_ptr<StepRuntime> step_runtime;  // this rank's share of each step's schedule
  bool sharded_model = false;  // tp or ep > 1: ranks hold different parameter shards
  bool sharded_state = false;  // and/or ZeRO-1: ranks hold different optimizer state
  std::unique_ptr<MetricsWriter> metrics;  // rank 0's metrics.jsonl, once training starts
  std::unique_ptr<Zero1> zero1;
  int64_t dp_size = 1, dp_rank = 0;
  int64_t threads = 1;       // intra-op threads of this rank
  bool interactive = false;  // rank 0 writing to a terminal: the progress line redraws in place
  double peak_gflops_per_rank = 0;
  // Test hooks whose figures replaced a measurement in this run (the GEMM rates,
  // the budget's calibration): each metrics line lists them under "injected".
  std::set<std::string> injected_measurements;
  // training.async_checkpoint: rank 0's writer. Declared last, so it is
  // destroyed (waiting for a save in flight) before what the save uses.
  BackgroundSaver saver;

  void log(const std::string& line) const {
    if (rank == 0) std::fprintf(stdout, "%s\n", line.c_str()), std::fflush(stdout);
  }

  // Sums a small fp32/int64 tensor over the data-parallel ranks.
  void sum_over_ranks(at::Tensor& tensor) const {
    if (dp_size > 1) mesh->dp().all_reduce(tensor, {parallel::ReduceOp::kSum})->wait();
  }
  // The same over the pipeline ranks, whose stages each hold a share.
  void sum_over_pipeline(at::Tensor& tensor) const {
    if (mesh->shape().pp > 1) mesh->pp().all_reduce(tensor, {parallel::ReduceOp::kSum})->wait();
  }
  // The same over every rank (stop flags: all must agree).
  void sum_over_world(at::Tensor& tensor) const {
    if (world_size > 1) mesh->world().all_reduce(tensor, {parallel::ReduceOp::kSum})->wait();
  }

  // The full model (shards gathered over tp and ep): every rank takes part, rank 0 writes.
  TensorMap full_model_tensors() const {
    TensorMap tensors = model_tensors();
    if (!sharded_model) return tensors;
    for (const auto& [name, spec] : model->shard_specs()) tensors[name] = parallel::gather_full(tensors.at(name), spec, *mesh);
    return tensors;
  }

  TensorMap model_tensors() const {
    TensorMap tensors;
    for (const auto& item : model->named_parameters()) tensors[item.key()] = item.value();
    for (const auto& item : model->named_buffers()) {
      if (item.key().find("step_load") == std::string::npos) tensors[item.key()] = item.value();
    }
    return tensors;
  }

  void restore(const std::string& directory);

  // The first candidate every rank can read: one that fails its checks on any
  // rank (a missing or damaged file) is skipped by all, with a warning naming
  // the file; a layout or config mismatch is an error, not a reason to skip.
  void restore_first_usable(const std::vector<std::string>& candidates, bool fallback);

  // training.init_from: a checkpoint's (or a run's latest) weights, nothing else.
  void initialize_from(const std::string& path);

  // The checkpoint's full tensors: each rank takes its shard, whatever layout wrote them.
  void load_model_weights(const std::string& directory, const CheckpointTensors& tensors);

  void restore_optimizer(const std::string& directory, const CheckpointContents& contents, const CheckpointTensors& tensors);
  void load_optimizer_state(const TensorMap& own, const std::string& source);
  bool whole_optimizer_state() const;
  StateView state_view(const std::string& key, at::ScalarType data_dtype, at::IntArrayRef param_shape, int64_t dim) const;
  const parallel::ShardSpec* state_spec(const std::string& key, int64_t& dim) const;
  StateView local_state_view(const TensorMap& state, const std::string& key, int64_t dim) const;
  bool state_joins(const TensorMap& state, const std::string& key) const;
  at::Tensor gather_state(const TensorMap& state, const std::string& key) const;
  at::Tensor shard_state(const CheckpointTensors& tensors, const std::string& key, const std::string& source) const;
  at::Tensor read_shard(const CheckpointTensors& tensors, const std::string& name, at::IntArrayRef view, const parallel::ShardSpec& spec) const;
  at::IntArrayRef local_parameter_shape(const std::string& name) const {
    for (const NamedParameter& p : params) {
      if (p.name == name) return p.tensor.sizes();
    }
    throw std::logic_error("no parameter '" + name + "'");
  }

  // Seconds blocked in collectives so far, over every group of the mesh.
  double communication_seconds() const {
    std::vector<const parallel::Communicator*> seen;
    double total = 0;
    for (const parallel::Communicator* g : {&mesh->world(), &mesh->tp(), &mesh->dp(), &mesh->pp(), &mesh->ep(), &mesh->edp()}) {
      if (std::find(seen.begin(), seen.end(), g) != seen.end()) continue;
      seen.push_back(g);
      total += g->wait_seconds();
    }
    return total;
  }

  std::string layout_name() const {
    std::string name = mesh->shape().describe();
    if (config.parallel.virtual_pp > 1) name += " v" + std::to_string(config.parallel.virtual_pp);
    if (mesh->shape().pp > 1) name += " stages " + stages->split().describe();
    return name + (zero1 ? " zero1" : "");
  }

  // Writes a checkpoint of the current step; with training.async_checkpoint
  // only the snapshot happens here and rank 0 writes it in the background.
  void save(const Config& cfg);
  // Blocks until the save in flight is durable; its error becomes this rank's.
  void finish_saves();

  // The validation loss over a fixed set of held-out windows (the first
  // eval_sequences of the validation stream), dealt out over the data-parallel
  // ranks in contiguous slices: the same number on every layout and machine.
  double evaluate();

  // GPU-hours so far (a CPU rank counts as one device) and their price.
  double gpu_hours() const { return state.elapsed_seconds * world_size / 3600.0; }  // every rank of the mesh
  double usd() const { return gpu_hours() * config.budget.usd_per_gpu_hour; }

  // What the budget counts; a schedule sized by its budget (training.steps: 0) is never cut by it.
  BudgetSpend spend() const { return {state.elapsed_seconds, state.tokens_seen, gpu_hours(), usd()}; }
  bool sized_by_budget() const { return config.training.steps == 0; }
  // ZeRO-1 shards the optimizer state only where there is data parallelism.
  bool uses_zero1() const { return config.parallel.zero1 && mesh->shape().dp > 1; }

  // Whether the run's length is known: configured, or fixed by the budget.
  bool length_known() const { return config.training.steps > 0 || state.total_steps > 0; }
  // Steps of the run; until a budget-sized schedule is decided, unbounded (the
  // calibration steps run inside warmup).
  int64_t total_steps() const {
    if (config.training.steps > 0) return config.training.steps;
    return state.total_steps > 0 ? state.total_steps : std::numeric_limits<int64_t>::max();
  }

  // The held-out windows validation covers.
  int64_t eval_windows() const { return std::min(config.training.eval_sequences, loader->num_val_windows()); }

  void choose_precision_once();
  // A batch made by the loader (host memory) on the run's device, queued without waiting.
  at::Tensor to_device(const at::Tensor& batch) const {
    if (device.is_cpu()) return batch;
    return batch.pin_memory().to(device, /*non_blocking=*/true);
  }
  TrainResult evaluate_checkpoint();
  void fix_schedule(double step_seconds, double eval_seconds, int64_t tokens_per_step);
  // The budget-sized schedule's inputs as they stand now (the recent step time); off course: whether
  // resized_schedule would change its length (past the limit, or well inside it).
  ScheduleInputs schedule_now(const LoopState& loop) const;
  bool schedule_off_course(const LoopState& loop) const;
  void resize_schedule(LoopState& loop);

  // The run (trainer.cpp) and its setup (trainer_setup.cpp), in the order run() calls them.
  TrainResult run();
  void check_config();
  void setup_mesh();
  void log_placement() const;
  void build_model();
  void open_data();
  void restore_or_initialize();
  TrainResult reshard();
  RunFigures start_outputs();
  StepOutcome train_step(int64_t step, const RunFigures& figures, LoopState& loop);
  at::Tensor optimizer_step(int64_t step, double lr);
  std::vector<at::Tensor> update_expert_biases();
  at::Tensor clip_attention_logits();
  double validate_if_due(StepOutcome& outcome, bool forced);
  void report(const StepOutcome& outcome, const RunFigures& figures, LoopState& loop, bool deciding, bool last);
  StopVotes agree_to_stop(const LoopState& loop);
  void save_if_due(bool last, bool stopping);
  void announce_stop(const StopVotes& votes) const;
  TrainResult finish(TrainResult result);
};

}  // namespace fmoe::trainer
