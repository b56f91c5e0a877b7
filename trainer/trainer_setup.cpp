// Trainer::Impl's setup, in the order run() calls it: the ranks agree on the
// config, the device and mesh, the model and optimizer of this rank's shard, the
// data, the checkpoint resumed (or the weights a fine-tune starts from), and the
// outputs with the figures every step reports against.
#include "trainer/trainer_impl.h"

#include "common/test_hooks.h"
#include "parallel/mpi/mpi_communicator.h"
#include "parallel/topology.h"

namespace fmoe::trainer {

using config::ConfigError;
using config::TrainingConfig;
using config::to_yaml;
using checkpoint::resume_candidates;

namespace {

int64_t default_threads(int world_size) {
  const int64_t local_ranks = fmoe::trainer::local_ranks(world_size);
  const int64_t cores = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return std::max<int64_t>(1, cores / local_ranks);
}

}  // namespace

void Trainer::Impl::check_config() {
  const Config& cfg = config;
  if (options.world) {
    rank = options.world->rank();
    world_size = options.world->size();
  }
  if (const std::string error = cfg.model.trainer_support(); !error.empty()) throw ConfigError("model." + error);
  if (const std::string error = cfg.parallel.trainer_support(); !error.empty()) throw ConfigError("parallel." + error);
  // Ranks that disagree on the config would issue mismatched collectives: refuse at once.
  if (options.world && world_size > 1) {
    const uint32_t crc = common::crc32_of(to_yaml(cfg));
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
}

// The device, then the mesh: dp x pp x tp = world, ep carved out of dp.
void Trainer::Impl::setup_mesh() {
  const Config& cfg = config;
  const RunDevice run_device = setup_device(cfg);
  device = run_device.device;
  log(run_device.message);
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
    if (world_size > 1 && options.world->backend_name() == "mpi") {
      const bool on = parallel::set_mpi_progress_thread(cfg.parallel.mpi_progress_thread);
      if (cfg.parallel.mpi_progress_thread) {
        log(on ? "MPI progress thread: on (non-blocking operations advance while the rank computes)"
               : "MPI progress thread: off (this MPI gives no MPI_THREAD_MULTIPLE)");
      }
    }
    // Non-owning: the caller keeps the world communicator alive for the run.
    std::shared_ptr<parallel::Communicator> world(options.world, [](parallel::Communicator*) {});
    if (device.is_cuda()) {
      std::string message;
      world = device_world(world, cfg, world_size, &message);
      log(message);
    } else if (options.hooks.host_staging) {
      // Tests: a CPU run through the staging layer that carries CUDA tensors over MPI.
      world = parallel::with_host_staging(world, /*always=*/true);
      log("communication: MPI through host buffers (FMOE_HOST_STAGING=1)");
    }
    if (options.hooks.p2p_issue_order) {
      // Tests: NCCL's point-to-point rules on MPI, for the pipeline runtime's messages.
      parallel::set_mpi_issue_order_matching(true);
      log("point-to-point: messages match in issue order, not by tag, and a send completes once received; the pipeline "
          "sends and receives in groups, as over NCCL (FMOE_P2P_ISSUE_ORDER=1)");
    }
    mesh.emplace(world, shape);
    if (cfg.parallel.fb_overlap && shape.pp > 1) {
      // DualPipeV's overlapped forward talks on a lane of its own, beside the backward.
      if (!parallel::mpi_thread_multiple()) {
        throw ConfigError("parallel.fb_overlap: two threads of a rank communicate at once, and this MPI was not initialised "
                          "with MPI_THREAD_MULTIPLE");
      }
      mesh.emplace(mesh->with_second_lane());
      log("communication: a second lane of every group, for the forwards of DualPipeV's overlapped F&B pairs on a second thread "
          "(parallel.fb_overlap)");
    }
    log_placement();
  } else {
    mesh.emplace(parallel::Mesh::single());
  }
  dp_size = shape.dp;
  dp_rank = mesh->coords().dp;
  sharded_model = shape.tp > 1 || shape.ep > 1;
  sharded_state = sharded_model || uses_zero1() || shape.pp > 1;
  threads = config.training.threads > 0 ? config.training.threads : default_threads(world_size);
  at::set_num_threads(static_cast<int>(threads));
  log("moe-train: " + std::to_string(world_size) + " rank" + (world_size > 1 ? "s" : "") + " x " + std::to_string(threads) +
      " thread" + (threads > 1 ? "s" : "") + "; building the model, then timing BF16 and FP32 GEMMs (about a second)");
}

// Where the mesh's groups fall on the nodes, and how far a token's experts reach.
void Trainer::Impl::log_placement() const {
  const parallel::MeshShape& shape = mesh->shape();
  const std::vector<std::string> node_of_rank = parallel::node_names(*options.world);
  for (const std::string& line : parallel::describe_placement(shape, node_of_rank)) log(line);
  const auto& m = config.model;
  if (shape.ep > 1 && m.num_groups > 1 && m.num_experts % m.num_groups == 0 && m.num_experts % shape.ep == 0) {
    const int nodes = parallel::max_nodes_per_token(shape, node_of_rank, static_cast<int>(m.num_experts), static_cast<int>(m.num_groups),
                                                     static_cast<int>(m.group_top_k));
    log("routing: group_top_k " + std::to_string(m.group_top_k) + " of " + std::to_string(m.num_groups) +
        " expert groups: a token's experts sit on at most " + std::to_string(nodes) + " node" + (nodes > 1 ? "s" : ""));
  }
}

// Every rank draws the same initial parameters from the shared seed and keeps
// its shard; under pipelining, the parameters of its stages.
void Trainer::Impl::build_model() {
  const Config& cfg = config;
  const parallel::MeshShape& shape = mesh->shape();
  torch::manual_seed(static_cast<uint64_t>(cfg.training.seed));
  moe::Parallelism parallelism{*mesh,
                               cfg.parallel.expert_dispatcher == "allgather" ? moe::ExpertDispatcher::kAllGather
                                                                             : moe::ExpertDispatcher::kAllToAll,
                               cfg.parallel.sequence_parallel, cfg.parallel.ep_overlap};
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
  if (uses_zero1()) {
    zero1 = std::make_unique<Zero1>(params, sharded_over_tp, is_expert, *mesh, cfg.optimizer, &cfg.model);
  } else {
    grad_sync = std::make_unique<parallel::GradientSync>(dense, experts, *mesh, static_cast<int64_t>(cfg.parallel.bucket_mb * (1 << 20)));
    grad_sync->enable_overlap(/*deferred=*/tp_partial);
    optimizer = std::make_unique<Optimizer>(params, cfg.optimizer, &cfg.model);
  }
  if (zero1) zero1->set_tensor_parallel(*mesh, model->shard_specs());
  if (optimizer) optimizer->set_tensor_parallel(*mesh, model->shard_specs());
  // A rank keeps only its stages' weights (other stages' come back for checkpoints).
  stages->release_foreign(*model, static_cast<int>(mesh->coords().pp));
  // QK-clip: every attention records its heads' largest logits in training forwards.
  if (cfg.optimizer.qk_clip_threshold > 0) {
    for (const auto& layer : model->transformer_layers()) layer->qk_clip().record = true;
  }
  std::string pipeline_message;
  step_runtime = std::make_unique<StepRuntime>(stages->make_runtime(*model, cfg, *mesh, device, &pipeline_message));
  if (!pipeline_message.empty()) log(pipeline_message);
}

void Trainer::Impl::open_data() {
  const Config& cfg = config;
  const auto dataset = data::IndexedDataset::open(cfg.data.prefix);
  if (dataset->vocab_size() > cfg.model.vocab_size) {
    throw ConfigError("data.prefix: " + cfg.data.prefix + " was tokenized with " + std::to_string(dataset->vocab_size()) +
                      " tokens, more than model.vocab_size " + std::to_string(cfg.model.vocab_size));
  }
  data::LoaderOptions loader_options;
  loader_options.seq_len = cfg.training.seq_len;
  loader_options.micro_batch_size = cfg.training.micro_batch_size;
  loader_options.num_micro_batches = cfg.training.grad_accum_steps;
  loader_options.dp_size = dp_size;
  loader_options.seed = static_cast<uint64_t>(cfg.training.seed);
  loader_options.val_fraction = cfg.data.val_fraction;
  loader_options.split_seed = static_cast<uint64_t>(cfg.data.split_seed);
  loader = std::make_unique<data::TokenLoader>(dataset, loader_options);
  state.loader_seed = loader_options.seed;
}

// --resume and --eval-only: the run's newest usable checkpoint (or the one
// named); training.init_from: a fine-tune's starting weights.
void Trainer::Impl::restore_or_initialize() {
  const TrainingConfig& tc = config.training;
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
}

// --reshard: the resumed checkpoint written again under this run's layout.
TrainResult Trainer::Impl::reshard() {
  save(config);
  finish_saves();
  TrainResult done;
  done.final_step = state.step;
  return done;
}

// The run directory's config and metrics, the precision, and the lines that
// describe the run; returns the figures every step reports against.
RunFigures Trainer::Impl::start_outputs() {
  const Config& cfg = config;
  const TrainingConfig& tc = cfg.training;
  const parallel::MeshShape& shape = mesh->shape();
  if (rank == 0) {
    std::filesystem::create_directories(tc.run_dir);
    common::write_file_atomic(tc.run_dir + "/config.yaml", to_yaml(cfg));
    metrics = std::make_unique<MetricsWriter>(tc.run_dir + "/metrics.jsonl", options.resume ? state.step : -1);
  }
  interactive = rank == 0 && isatty(STDERR_FILENO);
  const moe::ParameterCounts counts = moe::count_parameters(cfg.model);
  choose_precision_once();
  RunFigures figures;
  figures.flops_per_token = moe::training_flops_per_token(cfg.model, tc.seq_len);
  figures.peak_gflops = peak_gflops_per_rank * world_size;
  figures.tokens_per_step = tc.micro_batch_size * tc.seq_len * tc.grad_accum_steps * dp_size;
  figures.state_bytes = zero1 ? zero1->bytes_per_parameter() : optimizer->bytes_per_parameter();
  char summary[512];
  std::snprintf(summary, sizeof(summary),
                "model: %.2fM parameters, %.2fM activated per token | %.1f MFLOP/token | layout dp=%lld pp=%lld tp=%lld ep=%lld (%s experts) | %lld threads/rank | %s\n"
                "data: %lld train tokens, %lld validation tokens | %lld tokens/step | peak %.0f GFLOP/s (%s GEMM, all ranks%s)",
                counts.total / 1e6, counts.activated / 1e6, figures.flops_per_token / 1e6, static_cast<long long>(shape.dp),
                static_cast<long long>(shape.pp), static_cast<long long>(shape.tp), static_cast<long long>(shape.ep), cfg.parallel.expert_dispatcher.c_str(),
                static_cast<long long>(threads), state.precision.c_str(), static_cast<long long>(loader->train_tokens()),
                static_cast<long long>(loader->val_tokens()), static_cast<long long>(figures.tokens_per_step), figures.peak_gflops,
                state.precision.c_str(), injected_measurements.count("FMOE_GEMM_GFLOPS") ? "; injected, not measured" : "");
  log(summary);
  if (zero1) {
    char text[160];
    std::snprintf(text, sizeof(text), "zero1: this rank owns the optimizer state of %.2fM of %.2fM local parameters",
                  zero1->owned_numel() / 1e6, static_cast<double>(std::accumulate(params.begin(), params.end(), int64_t{0},
                      [](int64_t n, const NamedParameter& p) { return n + p.tensor.numel(); })) / 1e6);
    log(text);
  }
  log("memory per parameter: " + figures.state_bytes.format() + " (optimizer " + cfg.optimizer.name + ", master " +
      cfg.optimizer.main_params_dtype + ", grads " +
      cfg.optimizer.grad_dtype + ", exp_avg " + cfg.optimizer.exp_avg_dtype + ", exp_avg_sq " + cfg.optimizer.exp_avg_sq_dtype + ")");
  if (cfg.precision.fp8) log("fp8 GEMMs: " + fp8::fp8_gemm_backend(device));
  if (tc.eval_sequences > loader->num_val_windows()) {
    log("validation: training.eval_sequences " + std::to_string(tc.eval_sequences) + " exceeds the " +
        std::to_string(loader->num_val_windows()) + " held-out windows; evaluating all of them");
  }
  if (!length_known() && !cfg.budget.limited_in_time()) fix_schedule(0, 0, figures.tokens_per_step);
  if (const std::string warning = token_limit_warning(cfg.budget, tc.steps, figures.tokens_per_step); !warning.empty()) log(warning);
  return figures;
}

}  // namespace fmoe::trainer
