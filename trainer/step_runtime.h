// One optimizer step's forwards and backwards, run as this rank's action list
// of a pipeline schedule (parallel/pipeline_schedule.h). Without pipelining the
// list is the one-stage 1F1B schedule — forward a micro-batch, then its
// backward — so gradient accumulation is the schedule's micro-batch loop, and a
// pipelined step will run through the same loop with its sends and receives.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>

#include "moe/model.h"
#include "parallel/pipeline_schedule.h"

namespace fmoe::trainer {

struct StepHooks {
  // The tokens of micro-batch `micro` ([B, T + 1], on the model's device).
  std::function<at::Tensor(int64_t micro)> batch;
  // Called before each backward; `last` for the step's final one (the gradient
  // buckets launch their reductions during that backward).
  std::function<void(bool last)> before_backward;
};

struct StepTotals {
  at::Tensor losses;        // FP64 [3] on the device: cross-entropy, aux and z losses summed over micro-batches
  double data_seconds = 0;  // spent making batches
};

class StepRuntime {
 public:
  // schedule: this step's actions (its micro-batches are the gradient-accumulation steps).
  // Throws std::invalid_argument for a schedule of several pipeline ranks (not run by moe-train yet).
  StepRuntime(moe::MoEModel& model, parallel::PipelineSchedule schedule);
  StepTotals run(const StepHooks& hooks, at::ScalarType compute_dtype, bool fp8);
  const parallel::PipelineSchedule& schedule() const { return schedule_; }

 private:
  moe::MoEModel& model_;
  parallel::PipelineSchedule schedule_;
};

}  // namespace fmoe::trainer
