#include "trainer/pipeline_stages.h"

#include <ATen/ATen.h>
#include <torch/torch.h>

#include <stdexcept>

#include "parallel/mpi/mpi_communicator.h"
#include "parallel/pipeline_schedule.h"

namespace fmoe::trainer {

using config::Config;
using config::ConfigError;
using config::TrainingConfig;

std::string schedule_name(const Config& config) {
  const std::string& name = config.parallel.pipeline_schedule;
  if (name != "auto") return name;
  return config.parallel.virtual_pp > 1 ? "interleaved" : "1f1b";
}

PipelineStages::PipelineStages(const Config& config, const parallel::MeshShape& shape) : pp_(shape.pp) {
  if (pp_ == 1) return;
  const int64_t stages = shape.pp * config.parallel.virtual_pp;
  const std::string& written = config.parallel.pipeline_layout;
  split_ = written.empty() ? moe::balance_stages(config.model, config.training.seq_len, stages)
                           : moe::parse_stage_layout(written, config.model, config.training.seq_len, stages);
  placement_ = parallel::stage_placement(schedule_name(config), static_cast<int>(shape.pp), static_cast<int>(config.parallel.virtual_pp));
  for (int64_t s = 0; s < stages; ++s) {
    const moe::PipelineStage& st = split_.stages[static_cast<size_t>(s)];
    const int owner = placement_.at(static_cast<size_t>(s));
    for (int64_t l = st.first_layer; l < st.first_layer + st.num_layers; ++l) owner_["layers." + std::to_string(l) + "."] = owner;
    if (st.embedding) owner_["embedding."] = owner;
    if (st.head) owner_["head."] = owner, owner_["mtp."] = owner;
  }
  if (config.model.mtp_depth > 0 && owner_.at("head.") != owner_.at("embedding.")) {
    throw ConfigError("model.mtp_depth: multi-token prediction needs the embedding on the head's rank; with pp > 1 use "
                      "parallel.pipeline_schedule: dualpipev (its first rank holds both)");
  }
}

int PipelineStages::owner_of(const std::string& name) const {
  if (pp_ == 1) return 0;
  for (const auto& [prefix, rank] : owner_) {
    if (name.rfind(prefix, 0) == 0) return rank;
  }
  throw std::logic_error("pipeline: no stage holds parameter " + name);
}

void PipelineStages::release_foreign(moe::MoEModel& model, int pp_rank) {
  if (pp_ == 1) return;
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    if (owner_of(item.key()) == pp_rank) continue;
    released_[item.key()] = item.value().sizes().vec();
    item.value().set_data(at::empty({0}, item.value().options()));
  }
}

bool PipelineStages::holds(const std::string& name, int pp_rank) const {
  return pp_ == 1 || owner_of(name) == pp_rank || released_.count(name) == 0;
}

void PipelineStages::gather_all(moe::MoEModel& model, parallel::Communicator& pp) {
  if (pp_ == 1) return;
  torch::NoGradGuard no_grad;
  for (auto& item : model.named_parameters()) {
    at::Tensor& t = item.value();
    const auto it = released_.find(item.key());
    if (it != released_.end()) {
      t.set_data(at::empty(it->second, t.options()));
      released_.erase(it);
    }
    pp.broadcast(t, {owner_of(item.key())})->wait();
  }
}

StepRuntime PipelineStages::make_runtime(moe::MoEModel& model, const Config& config, const parallel::Mesh& mesh, c10::Device device,
                                         std::string* message) const {
  const TrainingConfig& tc = config.training;
  const parallel::MeshShape& shape = mesh.shape();
  const int micro = static_cast<int>(tc.grad_accum_steps);
  if (pp_ == 1) return StepRuntime(model, parallel::make_schedule("1f1b", 1, 1, micro));
  const int v = static_cast<int>(config.parallel.virtual_pp);
  const std::string name = schedule_name(config);
  PipelineContext context;
  context.pp = &mesh.pp();
  context.stages = split_.stages;
  context.rows_divisor = config.parallel.sequence_parallel ? shape.tp : 1;
  context.hidden_rows = tc.micro_batch_size * tc.seq_len / context.rows_divisor;
  context.hidden_dim = config.model.hidden_size;
  context.device = device;
  // NCCL's point-to-point rules (and MPI made to follow them in tests): sends and receives in groups.
  context.grouped_p2p = mesh.pp().backend_name().find("nccl") != std::string::npos || parallel::mpi_issue_order_matching();
  context.fb_overlap = config.parallel.fb_overlap;
  try {
    StepRuntime runtime(model, parallel::make_schedule(name, static_cast<int>(shape.pp), v, micro), context);
    *message = "pipeline: " + name + " over " + std::to_string(shape.pp) + " ranks x " + std::to_string(v) + " chunk" +
               (v > 1 ? "s" : "") + ", " + std::to_string(micro) + " micro-batches per step; stages " + split_.describe() +
               (context.grouped_p2p ? "; sends and receives in groups" : "") + (context.fb_overlap ? "; F&B pairs overlapped" : "");
    return runtime;
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    throw ConfigError(what.rfind("parallel.", 0) == 0 ? what : "parallel.pipeline_schedule: " + what);
  }
}

}  // namespace fmoe::trainer
