// A run's pipeline stages: the split of the model's stage list over pp x
// virtual_pp stages (moe/stage_split.h), which pipeline rank trains each
// parameter, keeping every rank's copy of the others current, and the step's
// runtime for this rank's share of the schedule.
#pragma once

#include <c10/core/Device.h>

#include <map>
#include <string>

#include "moe/model.h"
#include "moe/stage_split.h"
#include "parallel/mesh.h"
#include "config/config.h"
#include "trainer/step_runtime.h"

namespace fmoe::trainer {

using config::Config;

// parallel.pipeline_schedule with auto resolved: interleaved when virtual_pp > 1, else 1f1b.
std::string schedule_name(const Config& config);

class PipelineStages {
 public:
  // Without pipelining (pp 1) one stage holds everything.
  PipelineStages(const Config& config, const parallel::MeshShape& shape);
  bool pipelined() const { return pp_ > 1; }
  const moe::StageSplit& split() const { return split_; }
  // The pipeline rank whose stages hold a parameter (by name: embedding., layers.<i>., head.).
  int owner_of(const std::string& name) const;
  // Frees this rank's copies of the parameters other pipeline ranks train (their
  // storage becomes empty), so a rank holds only its stages' weights.
  void release_foreign(moe::MoEModel& model, int pp_rank);
  // Whether this rank holds a parameter's values (its stages', or all between gather and release).
  bool holds(const std::string& name, int pp_rank) const;
  // Every rank's copy of every parameter, allocated again where released and
  // broadcast over the pp group from the rank that trains it (for a checkpoint);
  // release_foreign frees them again.
  void gather_all(moe::MoEModel& model, parallel::Communicator& pp);
  // The step's forwards and backwards for this rank: the one-stage 1F1B schedule
  // without pipelining, else parallel.pipeline_schedule over the split. Throws
  // ConfigError naming parallel.pipeline_schedule; *message describes the pipeline.
  StepRuntime make_runtime(moe::MoEModel& model, const Config& config, const parallel::Mesh& mesh, c10::Device device,
                           std::string* message) const;

 private:
  int64_t pp_ = 1;
  moe::StageSplit split_;
  std::vector<int> placement_;        // stage -> pipeline rank (parallel::stage_placement)
  std::map<std::string, int> owner_;  // parameter name prefix -> pipeline rank
  std::map<std::string, std::vector<int64_t>> released_;  // name -> the shape its storage had
};

}  // namespace fmoe::trainer
