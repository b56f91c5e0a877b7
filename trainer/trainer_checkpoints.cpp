#include "trainer/trainer_impl.h"

#include <set>

// Saving a checkpoint and starting from one: resume (with fallback past a
// damaged checkpoint), training.init_from, and the weights under any layout.

namespace fmoe::trainer {

using config::Config;
using config::ConfigError;
using config::to_yaml;
using checkpoint::TensorMap;
using checkpoint::CheckpointContents;
using checkpoint::save_checkpoint;
using checkpoint::latest_checkpoint;
using checkpoint::load_checkpoint;
using checkpoint::CheckpointTensors;
using checkpoint::rank_state_file;
using checkpoint::send_rank_state;
using checkpoint::receive_state;
using checkpoint::receive_rank_states;
using checkpoint::receive_rank_states_now;
using checkpoint::load_rank_state;
namespace {

// An optimizer-state tensor's parameter and part: "<moment>.<param>.<part>" with
// moment exp_avg | exp_avg_sq | master and part data | scales; {} for anything else.
std::pair<std::string, std::string> state_parameter(const std::string& key) {
  for (const std::string suffix : {".data", ".scales"}) {
    if (key.size() <= suffix.size() || key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) continue;
    for (const std::string prefix : {"exp_avg_sq.", "exp_avg.", "master."}) {
      if (key.rfind(prefix, 0) == 0) return {key.substr(prefix.size(), key.size() - prefix.size() - suffix.size()), suffix.substr(1)};
    }
  }
  return {};
}

// The data entry of a state entry's moment: "<moment>.<param>.data".
std::string data_key(const std::string& key) {
  return key.substr(0, key.size() - state_parameter(key).second.size()) + "data";
}

// The deepest dimension a spec splits under a mesh shape, or -1 when it splits none.
int64_t split_dim(const parallel::ShardSpec& spec, const parallel::MeshShape& shape) {
  int64_t dim = -1;
  if (spec.ep_dim >= 0 && shape.ep > 1) dim = std::max(dim, spec.ep_dim);
  if (spec.tp_dim >= 0 && shape.tp > 1) dim = std::max(dim, spec.tp_dim);
  return dim;
}

}  // namespace

// How one optimizer-state tensor follows its parameter's sharding, exactly: the
// stored values are moved, never converted. FP32 and BF16 data are shaped like
// the parameter. FP16 data carries one scale for the whole tensor: it splits
// (each shard keeps the scale) but shards with different scales do not join.
// FP8 codes [numel] and per-tile scales [1, tiles] are flat (FP6 momentum: 3 bytes
// per 4 codes, scales [tiles], tiles of 32); they split and join
// along the parameter's dimensions when no tile crosses a shard boundary, i.e.
// when the elements past the split dimension d fill whole tiles: then codes
// viewed as shape[:d+1] + [inner] and scales as shape[:d+1] + [inner / block]
// shard like the parameter.
StateView Trainer::Impl::state_view(const std::string& key, at::ScalarType dtype, at::IntArrayRef param_shape, int64_t dim) const {
  const std::string part = state_parameter(key).second;
  StateView view;
  if (dtype == at::kHalf) {
    view.why = "FP16 state has one scale per tensor";
    view.splits = true;
    view.replicated = part == "scales";  // every shard keeps the tensor's scale
    if (!view.replicated) view.shape = param_shape.vec();
    return view;
  }
  if (dtype == at::kFloat || dtype == at::kBFloat16) {
    view.shape = param_shape.vec();
    view.splits = view.joins = true;
    return view;
  }
  // FP8 (FP6 momentum: tiles of 32, 3 bytes per 4 codes, E8M0 scales [tiles]): whole tiles past the split dimension.
  const bool fp6 = key.rfind("exp_avg.", 0) == 0 && config.optimizer.exp_avg_dtype == "fp6";
  const int64_t block = fp6 ? 32 : config.optimizer.state_block_size;
  int64_t inner = 1;
  for (size_t i = static_cast<size_t>(dim) + 1; i < param_shape.size(); ++i) inner *= param_shape[i];
  if (inner % block != 0) {
    view.why = "its " + std::string(fp6 ? "FP6" : "FP8") + " tiles of " + std::to_string(block) + " values would cross the shard boundaries (" +
               std::to_string(inner) + " values past the split dimension)";
    return view;
  }
  view.shape.assign(param_shape.begin(), param_shape.begin() + dim + 1);
  view.shape.push_back(part == "data" ? inner / (fp6 ? 4 : 1) * (fp6 ? 3 : 1) : inner / block);
  view.flat = part == "data" || fp6 ? std::vector<int64_t>{-1} : std::vector<int64_t>{1, -1};
  view.splits = view.joins = true;
  return view;
}

// The spec and split dimension of a state entry's parameter under this mesh; nullptr when unsplit.
const parallel::ShardSpec* Trainer::Impl::state_spec(const std::string& key, int64_t& dim) const {
  if (!sharded_model) return nullptr;
  const auto& specs = model->shard_specs();
  const auto spec = specs.find(state_parameter(key).first);
  if (spec == specs.end()) return nullptr;
  dim = split_dim(spec->second, mesh->shape());
  return dim < 0 ? nullptr : &spec->second;
}

// The view of this rank's entry of its own state (parameter shapes local).
StateView Trainer::Impl::local_state_view(const TensorMap& state, const std::string& key, int64_t dim) const {
  return state_view(key, state.at(data_key(key)).scalar_type(), local_parameter_shape(state_parameter(key).first), dim);
}

bool Trainer::Impl::state_joins(const TensorMap& state, const std::string& key) const {
  int64_t dim = -1;
  return state_spec(key, dim) == nullptr || local_state_view(state, key, dim).joins;
}

// The whole tensor of a sharded optimizer-state entry (collective over tp and
// ep, like the weights); state_joins(state, key) must hold.
at::Tensor Trainer::Impl::gather_state(const TensorMap& state, const std::string& key) const {
  const at::Tensor& tensor = state.at(key);
  int64_t dim = -1;
  const parallel::ShardSpec* spec = state_spec(key, dim);
  if (spec == nullptr) return tensor;
  const StateView view = local_state_view(state, key, dim);
  TORCH_CHECK(view.joins, "optimizer state '", key, "' cannot be joined exactly: ", view.why);
  const at::Tensor full = parallel::gather_full(tensor.reshape(view.shape), *spec, *mesh);
  return view.flat.empty() ? full : full.reshape(view.flat);
}

// This rank's part of a checkpoint tensor viewed as `view` (dim 0 its
// parameter's dim 0): only the rows it needs are read when the split is along
// dim 0 (experts over ep, row-split projections over tp), else the whole tensor.
at::Tensor Trainer::Impl::read_shard(const CheckpointTensors& tensors, const std::string& name, at::IntArrayRef view,
                                     const parallel::ShardSpec& spec) const {
  const parallel::MeshShape& shape = mesh->shape();
  const parallel::MeshCoords& coords = mesh->coords();
  if (spec.ep_dim == 0 && shape.ep > 1 && view[0] % shape.ep == 0) {
    const int64_t part = view[0] / shape.ep;
    parallel::ShardSpec rest = spec;
    rest.ep_dim = -1;  // the rows are this rank's experts; tp splits them further
    return parallel::local_shard(tensors.read_rows(name, view, coords.ep * part, (coords.ep + 1) * part), rest, shape, coords);
  }
  if (spec.ep_dim < 0 && spec.tp_dim == 0 && shape.tp > 1 && spec.tp_blocks.size() <= 1 && view[0] % shape.tp == 0) {
    const int64_t part = view[0] / shape.tp;
    return tensors.read_rows(name, view, coords.tp * part, (coords.tp + 1) * part);
  }
  return parallel::local_shard(tensors.read(name).reshape(view), spec, shape, coords);
}

// This rank's exact shard of a whole optimizer-state entry; a ConfigError
// (every rank fails alike) when this layout would split a tile.
at::Tensor Trainer::Impl::shard_state(const CheckpointTensors& tensors, const std::string& key, const std::string& source) const {
  int64_t dim = -1;
  const parallel::ShardSpec* spec = state_spec(key, dim);
  if (spec == nullptr) return tensors.read(key);
  const std::string param = state_parameter(key).first;
  if (!tensors.contains(param)) throw std::runtime_error(source + ": parameter '" + param + "' of state '" + key + "' is missing");
  const StateView view = state_view(key, tensors.dtype(data_key(key)), tensors.shape(param), dim);
  if (view.replicated) return tensors.read(key);
  if (!view.splits) {
    throw ConfigError(source + ": optimizer state '" + key + "' cannot be split exactly under layout " + layout_name() + ": " + view.why);
  }
  const at::Tensor local = read_shard(tensors, key, view.shape, *spec);
  return view.flat.empty() ? local : local.reshape(view.flat);
}

// Optimizer state a checkpoint can hold whole, like the weights, and any layout
// can take its shard of: FP32 moments (ZeRO-1's gathered from their owners),
// and without ZeRO-1 low-precision state whose shards join exactly (BF16; FP8
// whose tiles stay inside the shards; FP16 unsplit). Pipeline stages' state is
// joined on rank 0 like the weights.
bool Trainer::Impl::whole_optimizer_state() const {
  if (zero1) return zero1->all_fp32();
  if (!optimizer) return false;
  if (optimizer->all_fp32()) return true;
  const TensorMap local = optimizer->state();
  return std::all_of(local.begin(), local.end(), [&](const auto& item) { return state_joins(local, item.first); });
}

void Trainer::Impl::restore(const std::string& directory) {
  const CheckpointContents contents = load_checkpoint(directory, /*read_tensors=*/false);
  const CheckpointTensors tensors(directory, contents);
  load_model_weights(directory, tensors);
  if (options.eval_only) {  // the weights are all validation needs, under any layout
    state = contents.state;
    log("loaded the model of " + directory + " (step " + std::to_string(state.step) + ") for validation");
    return;
  }
  restore_optimizer(directory, contents, tensors);
  char text[160];
  std::snprintf(text, sizeof(text), "rank 0 read %.1f MB of the checkpoint's %.1f MB of whole tensors", tensors.bytes_read() / 1e6,
                static_cast<double>(std::filesystem::file_size(directory + "/model.safetensors") +
                                    std::filesystem::file_size(directory + "/optimizer.safetensors")) / 1e6);
  log(text);
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
  load_model_weights(directory, CheckpointTensors(directory, load_checkpoint(directory, /*read_tensors=*/false)));
  log("initialized the model from " + directory);
}

// The checkpoint's full tensors: each rank takes its shard, whatever layout wrote them.
void Trainer::Impl::load_model_weights(const std::string& directory, const CheckpointTensors& tensors) {
  const std::string model_file = directory + "/model.safetensors";
  torch::NoGradGuard no_grad;
  // The checkpoint holds full tensors: each rank reads its shard, whatever layout wrote it.
  const auto& specs = model->shard_specs();
  for (auto& [name, tensor] : model_tensors()) {
    if (!stages->holds(name, static_cast<int>(mesh->coords().pp))) continue;  // another pipeline rank's
    if (!tensors.contains(name)) throw std::runtime_error(model_file + ": tensor '" + name + "' is missing");
    const std::vector<int64_t> stored = tensors.shape(name);
    const auto spec = specs.find(name);
    at::Tensor source;
    if (spec == specs.end() || !sharded_model || stored.empty()) {
      if (stored == tensor.sizes().vec()) source = tensors.read(name);
    } else {
      // The full shape this rank's shard implies; another one is a different model, reported below.
      const at::Tensor implied = parallel::local_shard(at::empty(stored, at::TensorOptions().device(at::kMeta)), spec->second, mesh->shape(), mesh->coords());
      if (implied.sizes().equals(tensor.sizes())) source = read_shard(tensors, name, stored, spec->second);
    }
    if (!source.defined() || !source.sizes().equals(tensor.sizes())) {
      throw std::runtime_error(model_file + ": tensor '" + name + "' has shape " + c10::str(at::IntArrayRef(stored)) +
                               ", the configured model expects " + c10::str(tensor.sizes()) +
                               (sharded_model ? " on this rank" : ""));
    }
    tensor.copy_(source);
  }
}

void Trainer::Impl::restore_optimizer(const std::string& directory, const CheckpointContents& contents, const CheckpointTensors& tensors) {
  // Optimizer state: whole in one file (each rank takes its shard, under any
  // layout), or written under a layout that shards it, one file per rank.
  const std::string written_layout = contents.layout.empty() ? "dp" : contents.layout;
  const bool written_sharded = contents.checksums.count(rank_state_file(1)) > 0;
  if (!written_sharded) {
    std::set<std::string> trained;  // this rank's stages' parameters
    for (const NamedParameter& p : params) trained.insert(p.name);
    TensorMap own;
    for (const std::string& key : tensors.names("optimizer.safetensors")) {
      const std::string param = state_parameter(key).first;
      if (!param.empty() && !trained.count(param)) continue;  // another pipeline rank's
      own[key] = shard_state(tensors, key, directory + "/optimizer.safetensors");
    }
    load_optimizer_state(own, directory + "/optimizer.safetensors");
    state = contents.state;
    if (written_layout != layout_name()) log("optimizer state resharded: written under " + written_layout + ", now " + layout_name());
    log("resumed from " + directory + " at step " + std::to_string(state.step));
    return;
  }
  if (written_layout != layout_name()) {
    // Every rank sees the same mismatch: reported once, like a config error.
    throw ConfigError(directory + "/trainer_state.json: optimizer state was written under layout " + written_layout +
                             "; resume under that layout (this run is " + layout_name() + ")");
  }
  if (!sharded_state || rank == 0) {
    TensorMap own;
    for (const std::string& key : tensors.names("optimizer.safetensors")) own[key] = tensors.read(key);
    load_optimizer_state(own, directory + "/optimizer.safetensors");
  } else {
    load_optimizer_state(load_rank_state(directory, contents, rank), directory + "/" + rank_state_file(rank));
  }
  state = contents.state;
  log("resumed from " + directory + " at step " + std::to_string(state.step));
}

// This rank's optimizer state (ZeRO-1: the owned parameters' share) and the CPU RNG state saved with it.
void Trainer::Impl::load_optimizer_state(const TensorMap& own, const std::string& source) {
  if (zero1) {
    zero1->load_state(own, source);
  } else {
    optimizer->load_state(own, source);
  }
  if (const auto rng = own.find("rng.cpu"); rng != own.end()) {
    at::Generator generator = at::detail::getDefaultCPUGenerator();
    generator.set_state(rng->second);
  }
}

void Trainer::Impl::save(const Config& cfg) {
  stages->gather_all(*model, mesh->pp());  // rank 0 writes whole tensors: every stage's, for the moment
  TensorMap model_state = full_model_tensors();  // collective when sharded
  TensorMap optimizer_state;
  // Whole state where it can be (ZeRO-1's from its owners, then over tp and ep like the weights), else each rank's own file.
  const bool whole = whole_optimizer_state();
  const bool per_rank_files = sharded_state && !whole;
  if (whole && (sharded_model || zero1 || mesh->shape().pp > 1)) {
    const TensorMap local = zero1 ? zero1->full_state() : optimizer->state();
    // The same keys in the same order on every rank of a stage.
    for (const auto& item : local) optimizer_state[item.first] = gather_state(local, item.first);
    // Each stage's whole state joins rank 0's: its pipeline group's members send theirs.
    if (mesh->shape().pp > 1 && mesh->coords().dp == 0 && mesh->coords().tp == 0) {
      if (mesh->coords().pp != 0) {
        for (auto& [key, tensor] : optimizer_state) tensor = tensor.to(at::kCPU);
        send_rank_state(optimizer_state, mesh->pp());
      } else {
        for (int source = 1; source < mesh->shape().pp; ++source) {
          for (auto& [key, tensor] : receive_state(mesh->pp(), source)) optimizer_state.emplace(key, std::move(tensor));
        }
      }
    }
    if (rank != 0) optimizer_state.clear();
  } else if (rank == 0 || per_rank_files) {  // the ranks whose state is written
    optimizer_state = zero1 ? zero1->state() : optimizer->state();
  }
  if (rank == 0 || per_rank_files) optimizer_state["rng.cpu"] = at::detail::getDefaultCPUGenerator().get_state();
  // Checkpoints are written from host memory, whatever device trained. A save
  // in the background writes a snapshot: copies, since training goes on.
  const bool async = cfg.training.async_checkpoint;
  for (TensorMap* map : {&model_state, &optimizer_state}) {
    for (auto& [name, tensor] : *map) tensor = tensor.to(at::TensorOptions().device(at::kCPU), /*non_blocking=*/false, /*copy=*/async);
  }
  if (rank == 0) {
    CheckpointContents contents;
    contents.model = std::move(model_state);
    contents.optimizer = std::move(optimizer_state);
    contents.state = state;
    contents.config_yaml = to_yaml(cfg);
    contents.layout = layout_name();
    if (per_rank_files) contents.write_extra = async ? receive_rank_states_now(mesh->world()) : receive_rank_states(mesh->world());
    const std::string run_dir = cfg.training.run_dir;
    const int64_t keep = cfg.training.keep_checkpoints, keep_every = cfg.training.keep_every;
    auto write = [this, contents = std::move(contents), run_dir, keep, keep_every] {
      // The records up to this step are durable before the checkpoint becomes the latest.
      if (metrics) metrics->sync();
      const std::string dir = save_checkpoint(run_dir, contents, keep, keep_every);
      log("checkpoint saved: " + dir);
    };
    if (async) {
      saver.start(std::move(write));  // waits for the previous save: one in flight
    } else {
      write();
    }
  } else if (per_rank_files) {
    send_rank_state(optimizer_state, mesh->world());
  }
  model_state.clear();
  stages->release_foreign(*model, static_cast<int>(mesh->coords().pp));
  if (world_size > 1 && !async) mesh->world().barrier();
}

// Rank 0 writes every file of a checkpoint, so its files being durable is the
// whole save being durable: the other ranks agree by waiting for its word.
void Trainer::Impl::finish_saves() {
  std::string error;
  try {
    saver.wait();
  } catch (const std::exception& e) {
    error = e.what();
  }
  at::Tensor failed = at::full({1}, error.empty() ? 0.0f : 1.0f);
  if (world_size > 1) mesh->world().all_reduce(failed, {parallel::ReduceOp::kSum})->wait();
  if (!error.empty()) throw std::runtime_error("checkpoint save failed: " + error);
  if (failed.item<float>() > 0) throw std::runtime_error("checkpoint save failed on rank 0");
}

}  // namespace fmoe::trainer
