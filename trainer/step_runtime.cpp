#include "trainer/step_runtime.h"

#include <ATen/ATen.h>

#include <chrono>
#include <map>
#include <stdexcept>

namespace fmoe::trainer {

StepRuntime::StepRuntime(moe::MoEModel& model, parallel::PipelineSchedule schedule) : model_(model), schedule_(std::move(schedule)) {
  if (schedule_.pp != 1) {
    throw std::invalid_argument("parallel.pp: moe-train runs one pipeline stage per step for now (schedule " + schedule_.name +
                                " has " + std::to_string(schedule_.pp) + ")");
  }
  if (const std::string error = parallel::validate(schedule_); !error.empty()) throw std::invalid_argument("step schedule: " + error);
}

StepTotals StepRuntime::run(const StepHooks& hooks, at::ScalarType compute_dtype, bool fp8) {
  StepTotals totals;
  const double micro_batches = static_cast<double>(schedule_.micro_batches);
  std::map<int, moe::ModelOutput> in_flight;  // forwarded micro-batches awaiting their backward
  int backwards_left = schedule_.micro_batches;
  for (const parallel::PipeAction& action : schedule_.ranks.front()) {
    switch (action.op) {
      case parallel::PipeOp::kForward: {
        const auto start = std::chrono::steady_clock::now();
        const at::Tensor tokens = hooks.batch(action.micro);
        totals.data_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        in_flight[action.micro] = model_.forward(tokens, compute_dtype, fp8);
        break;
      }
      case parallel::PipeOp::kBackward: {
        const moe::ModelOutput out = std::move(in_flight.at(action.micro));
        in_flight.erase(action.micro);
        if (hooks.before_backward) hooks.before_backward(--backwards_left == 0);
        (out.loss / micro_batches).backward();
        const at::Tensor these = at::stack({out.ce_loss, out.aux_loss, out.z_loss}).to(at::kDouble);
        totals.losses = totals.losses.defined() ? totals.losses + these : these;
        break;
      }
      default:
        throw std::logic_error("step runtime: " + action.text() + " needs the pipeline's point-to-point runtime");
    }
  }
  return totals;
}

}  // namespace fmoe::trainer
