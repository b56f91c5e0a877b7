#include "trainer/trainer_impl.h"

// Saving a checkpoint and starting from one: resume (with fallback past a
// damaged checkpoint), training.init_from, and the weights under any layout.

namespace fmoe::trainer {
namespace {

// The parameter an FP32 optimizer-state tensor belongs to ("exp_avg.<name>.data",
// "exp_avg_sq.<name>.data"), or empty for anything else.
std::string state_parameter(const std::string& key) {
  const std::string suffix = ".data";
  if (key.size() <= suffix.size() || key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) return "";
  for (const std::string prefix : {"exp_avg_sq.", "exp_avg."}) {
    if (key.rfind(prefix, 0) == 0) return key.substr(prefix.size(), key.size() - prefix.size() - suffix.size());
  }
  return "";
}

}  // namespace

// Optimizer state a checkpoint can hold whole, like the weights, and any layout
// can take its shard of: FP32 moments (ZeRO-1's gathered from their owners)
// without pipeline stages.
bool Trainer::Impl::whole_optimizer_state() const {
  if (mesh->shape().pp > 1) return false;
  return zero1 ? zero1->all_fp32() : optimizer && optimizer->all_fp32();
}

void Trainer::Impl::restore(const std::string& directory) {
  const CheckpointContents contents = load_checkpoint(directory);
  load_model_weights(directory, contents);
  if (options.eval_only) {  // the weights are all validation needs, under any layout
    state = contents.state;
    log("loaded the model of " + directory + " (step " + std::to_string(state.step) + ") for validation");
    return;
  }
  restore_optimizer(directory, contents);
}

// The first candidate every rank can read: one that fails its checks on any
// rank (a missing or damaged file) is skipped by all, with a warning naming
// the file; a layout or config mismatch is an error, not a reason to skip.
void Trainer::Impl::restore_first_usable(const std::vector<std::string>& candidates, bool fallback) {
  for (size_t i = 0; i < candidates.size(); ++i) {
    std::string why;
    try {
      restore(candidates[i]);
    } catch (const ConfigError&) {
      throw;
    } catch (const std::runtime_error& e) {
      why = e.what();
    }
    at::Tensor failed = at::full({1}, why.empty() ? 0.0f : 1.0f);
    if (world_size > 1) mesh->world().all_reduce(failed, {parallel::ReduceOp::kSum})->wait();
    if (failed.item<float>() == 0) return;
    if (!fallback || i + 1 == candidates.size()) {
      throw std::runtime_error(why.empty() ? candidates[i] + ": another rank could not read its part" : why);
    }
    if (!why.empty()) {
      std::fprintf(stderr, "moe-train: warning (rank %d): %s; resuming from %s instead\n", rank, why.c_str(), candidates[i + 1].c_str());
      std::fflush(stderr);
    }
  }
}

// training.init_from: a checkpoint's (or a run's latest) weights, nothing else.
void Trainer::Impl::initialize_from(const std::string& path) {
  std::string directory = path;
  if (!std::filesystem::exists(path + "/trainer_state.json")) {
    const auto latest = latest_checkpoint(path);
    if (!latest) throw ConfigError("training.init_from: " + path + " is neither a checkpoint nor a run directory with checkpoints/latest");
    directory = *latest;
  }
  load_model_weights(directory, load_checkpoint(directory));
  log("initialized the model from " + directory);
}

// The checkpoint's full tensors: each rank takes its shard, whatever layout wrote them.
void Trainer::Impl::load_model_weights(const std::string& directory, const CheckpointContents& contents) {
  const std::string model_file = directory + "/model.safetensors";
  torch::NoGradGuard no_grad;
  // The checkpoint holds full tensors: each rank takes its shard, whatever layout wrote it.
  const auto specs = model->shard_specs();
  for (auto& [name, tensor] : model_tensors()) {
    if (!stages->holds(name, static_cast<int>(mesh->coords().pp))) continue;  // another pipeline rank's
    const auto it = contents.model.find(name);
    if (it == contents.model.end()) throw std::runtime_error(model_file + ": tensor '" + name + "' is missing");
    const auto spec = specs.find(name);
    at::Tensor source = it->second;
    try {
      if (spec != specs.end()) source = parallel::local_shard(source, spec->second, mesh->shape(), mesh->coords());
    } catch (const std::exception&) {
      source = it->second;  // reported as a shape mismatch below
    }
    if (!source.sizes().equals(tensor.sizes())) {
      throw std::runtime_error(model_file + ": tensor '" + name + "' has shape " + c10::str(it->second.sizes()) +
                               ", the configured model expects " + c10::str(tensor.sizes()) +
                               (sharded_model ? " on this rank" : ""));
    }
    tensor.copy_(source);
  }
}

void Trainer::Impl::restore_optimizer(const std::string& directory, const CheckpointContents& contents) {
  // Optimizer state: whole in one file (each rank takes its shard, under any
  // layout), or written under a layout that shards it, one file per rank.
  const std::string written_layout = contents.layout.empty() ? "dp" : contents.layout;
  const bool written_sharded = contents.checksums.count(rank_state_file(1)) > 0;
  if (!written_sharded && whole_optimizer_state()) {
    const auto specs = model->shard_specs();
    TensorMap own;
    for (const auto& [key, tensor] : contents.optimizer) {
      const auto spec = specs.find(state_parameter(key));
      own[key] = spec == specs.end() || !sharded_model ? tensor : parallel::local_shard(tensor, spec->second, mesh->shape(), mesh->coords());
    }
    if (zero1) {
      zero1->load_state(own, directory + "/optimizer.safetensors");  // the owned parameters' share
    } else {
      optimizer->load_state(own, directory + "/optimizer.safetensors");
    }
    if (const auto rng = own.find("rng.cpu"); rng != own.end()) {
      at::Generator generator = at::detail::getDefaultCPUGenerator();
      generator.set_state(rng->second);
    }
    state = contents.state;
    if (written_layout != layout_name()) log("optimizer state resharded: written under " + written_layout + ", now " + layout_name());
    log("resumed from " + directory + " at step " + std::to_string(state.step));
    return;
  }
  if ((sharded_state || written_sharded) && written_layout != layout_name()) {
    // Every rank sees the same mismatch: reported once, like a config error.
    throw ConfigError(directory + "/trainer_state.json: optimizer state was written under layout " + written_layout +
                             "; resume under that layout (this run is " + layout_name() + ")");
  }
  TensorMap own_state = contents.optimizer;
  std::string state_file = directory + "/optimizer.safetensors";
  if (sharded_state && rank != 0) {
    state_file = directory + "/" + rank_state_file(rank);
    own_state = load_rank_state(directory, contents, rank);
  }
  if (zero1) {
    zero1->load_state(own_state, state_file);
  } else {
    optimizer->load_state(own_state, state_file);
  }
  const auto rng = own_state.find("rng.cpu");
  if (rng != own_state.end()) {
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(rng->second);
  }
  state = contents.state;
  log("resumed from " + directory + " at step " + std::to_string(state.step));
}

void Trainer::Impl::save(const Config& cfg) {
  stages->gather_all(*model, mesh->pp());  // rank 0 writes whole tensors: every stage's, for the moment
  TensorMap model_state = full_model_tensors();  // collective when sharded
  TensorMap optimizer_state;
  // Whole state where it can be (ZeRO-1's from its owners, then over tp and ep like the weights), else each rank's own file.
  const bool whole = whole_optimizer_state();
  const bool per_rank_files = sharded_state && !whole;
  if (whole && (sharded_model || zero1)) {
    const auto specs = model->shard_specs();
    const TensorMap local = zero1 ? zero1->full_state() : optimizer->state();
    for (const auto& [key, tensor] : local) {  // the same keys in the same order on every rank
      const auto spec = specs.find(state_parameter(key));
      optimizer_state[key] = spec == specs.end() || !sharded_model ? tensor : parallel::gather_full(tensor, spec->second, *mesh);
    }
    if (rank != 0) optimizer_state.clear();
  } else if (rank == 0 || per_rank_files) {  // the ranks whose state is written
    optimizer_state = zero1 ? zero1->state() : optimizer->state();
  }
  if (rank == 0 || per_rank_files) optimizer_state["rng.cpu"] = at::detail::getDefaultCPUGenerator().get_state();
  // Checkpoints are written from host memory, whatever device trained.
  for (TensorMap* map : {&model_state, &optimizer_state}) {
    for (auto& [name, tensor] : *map) tensor = tensor.to(at::kCPU);
  }
  if (rank == 0) {
    CheckpointContents contents;
    contents.model = std::move(model_state);
    contents.optimizer = std::move(optimizer_state);
    contents.state = state;
    contents.config_yaml = to_yaml(cfg);
    contents.layout = layout_name();
    if (per_rank_files) contents.write_extra = receive_rank_states(mesh->world());
    // The records up to this step are durable before the checkpoint becomes the latest.
    if (metrics) metrics->sync();
    const std::string dir = save_checkpoint(cfg.training.run_dir, contents, cfg.training.keep_checkpoints, cfg.training.keep_every);
    log("checkpoint saved: " + dir);
  } else if (per_rank_files) {
    send_rank_state(optimizer_state, mesh->world());
  }
  model_state.clear();
  stages->release_foreign(*model, static_cast<int>(mesh->coords().pp));
  if (world_size > 1) mesh->world().barrier();
}

}  // namespace fmoe::trainer
