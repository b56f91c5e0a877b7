#include "trainer/budget.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <stdexcept>

#include "parallel/communicator.h"

namespace fmoe::trainer {

using config::BudgetConfig;

double budget_seconds(const BudgetConfig& b, int world_size) {
  double limit = 0;
  const auto take = [&](double seconds) { limit = limit > 0 ? std::min(limit, seconds) : seconds; };
  if (b.max_minutes > 0) take(b.max_minutes * 60.0);
  if (b.max_gpu_hours > 0) take(b.max_gpu_hours * 3600.0 / world_size);
  if (b.max_usd > 0 && b.usd_per_gpu_hour > 0) take(b.max_usd / b.usd_per_gpu_hour * 3600.0 / world_size);
  return limit;
}

int64_t size_schedule(const ScheduleInputs& in) {
  int64_t total = in.token_limit_steps > 0 ? in.token_limit_steps : 0;
  if (in.limit_seconds > 0) {
    const double left = kBudgetPlannedFraction * in.limit_seconds - in.elapsed_seconds - in.eval_seconds;  // the final pass
    const double per_step =
        std::max(1e-9, in.step_seconds + (in.eval_interval > 0 ? in.eval_seconds / static_cast<double>(in.eval_interval) : 0.0));
    const auto more = static_cast<int64_t>(std::floor(std::max(0.0, left) / per_step));
    const int64_t by_time = in.decided_at_step + more;
    total = total > 0 ? std::min(total, by_time) : by_time;
  }
  return std::max(total, in.decided_at_step + 1);
}

namespace {

// Validation passes after step `done` up to `total` under eval_interval, the final one included.
int64_t passes_left(int64_t done, int64_t total, int64_t interval) {
  const int64_t periodic = interval > 0 ? total / interval - done / interval : 0;
  return periodic + (interval > 0 && total % interval == 0 ? 0 : 1);
}

// Steps after decided_at_step that fit in `seconds` at in's step time, with the
// validation passes they trigger and the final one.
int64_t steps_that_fit(const ScheduleInputs& in, double seconds) {
  const double left = seconds - in.eval_seconds;  // the final pass
  const double per_step =
      std::max(1e-9, in.step_seconds + (in.eval_interval > 0 ? in.eval_seconds / static_cast<double>(in.eval_interval) : 0.0));
  return static_cast<int64_t>(std::floor(std::max(0.0, left) / per_step));
}

}  // namespace

double projected_seconds(const ScheduleInputs& in, int64_t total_steps) {
  const int64_t left = std::max<int64_t>(0, total_steps - in.decided_at_step);
  return in.elapsed_seconds + static_cast<double>(left) * in.step_seconds +
         static_cast<double>(passes_left(in.decided_at_step, total_steps, in.eval_interval)) * in.eval_seconds;
}

int64_t shortened_schedule(const ScheduleInputs& in, int64_t total_steps) {
  if (in.limit_seconds <= 0 || projected_seconds(in, total_steps) <= in.limit_seconds) return total_steps;
  const double left = kBudgetPlannedFraction * (in.limit_seconds - in.elapsed_seconds);
  return std::clamp(in.decided_at_step + steps_that_fit(in, left), std::min(in.decided_at_step + 1, total_steps), total_steps);
}

int64_t lengthened_schedule(const ScheduleInputs& in, int64_t total_steps) {
  if (in.limit_seconds <= 0 || projected_seconds(in, total_steps) >= kBudgetGrowBelowFraction * in.limit_seconds) return total_steps;
  // Up to the planned fraction of the whole budget (as when it was fixed): the
  // slack left for drift stays a tenth of the limit, not of the time left.
  int64_t grown = in.decided_at_step + steps_that_fit(in, kBudgetPlannedFraction * in.limit_seconds - in.elapsed_seconds);
  if (in.token_limit_steps > 0) grown = std::min(grown, in.token_limit_steps);
  return std::max(grown, total_steps);
}

int64_t resized_schedule(const ScheduleInputs& in, int64_t total_steps) {
  const int64_t shorter = shortened_schedule(in, total_steps);
  return shorter != total_steps ? shorter : lengthened_schedule(in, total_steps);
}

void agree_over_ranks(ScheduleInputs& in, parallel::Communicator& world) {
  if (world.size() == 1) return;
  at::Tensor times = at::tensor({in.step_seconds, in.eval_seconds, in.elapsed_seconds}, at::kDouble);
  world.all_reduce(times, {parallel::ReduceOp::kMax})->wait();
  in.step_seconds = times[0].item<double>();
  in.eval_seconds = times[1].item<double>();
  in.elapsed_seconds = times[2].item<double>();
}

std::string describe_schedule(const ScheduleInputs& in, int64_t total_steps, int64_t max_tokens, int64_t tokens_per_step) {
  char text[320];
  if (in.limit_seconds > 0) {
    std::snprintf(text, sizeof(text),
                  "schedule: %lld steps, fixed at step %lld from %.3f s/step and %.2f s per validation pass "
                  "(%.0f%% of a %.1f-minute budget planned, %.1f s spent%s)",
                  static_cast<long long>(total_steps), static_cast<long long>(in.decided_at_step), in.step_seconds,
                  in.eval_seconds, 100 * kBudgetPlannedFraction, in.limit_seconds / 60, in.elapsed_seconds,
                  in.injected ? "; times injected by FMOE_CALIBRATION, not measured" : "");
  } else {
    std::snprintf(text, sizeof(text), "schedule: %lld steps from budget.max_tokens %lld (%lld tokens/step)",
                  static_cast<long long>(total_steps), static_cast<long long>(max_tokens), static_cast<long long>(tokens_per_step));
  }
  return text;
}

double calibrated_step_seconds(const std::vector<double>& step_seconds) {
  const size_t skip = step_seconds.size() > 2 ? 2 : 0;
  return std::accumulate(step_seconds.begin() + static_cast<long>(skip), step_seconds.end(), 0.0) /
         static_cast<double>(step_seconds.size() - skip);
}

double recent_step_seconds(std::vector<double> step_seconds) {
  const size_t n = step_seconds.size();
  if (n == 0) return 0;
  std::sort(step_seconds.begin(), step_seconds.end());
  return n % 2 == 1 ? step_seconds[n / 2] : 0.5 * (step_seconds[n / 2 - 1] + step_seconds[n / 2]);
}

std::string budget_exhausted(const BudgetConfig& b, const BudgetSpend& spend, bool sized_by_budget) {
  char text[160] = "";
  if (sized_by_budget) return text;
  if (b.max_minutes > 0 && spend.elapsed_seconds >= b.max_minutes * 60) {
    std::snprintf(text, sizeof(text), "%.4g of budget.max_minutes %.4g minutes", spend.elapsed_seconds / 60, b.max_minutes);
  } else if (b.max_tokens > 0 && spend.tokens_seen >= b.max_tokens) {
    std::snprintf(text, sizeof(text), "%lld of budget.max_tokens %lld tokens", static_cast<long long>(spend.tokens_seen),
                  static_cast<long long>(b.max_tokens));
  } else if (b.max_gpu_hours > 0 && spend.gpu_hours >= b.max_gpu_hours) {
    std::snprintf(text, sizeof(text), "%.4g of budget.max_gpu_hours %.4g GPU-hours", spend.gpu_hours, b.max_gpu_hours);
  } else if (b.max_usd > 0 && spend.usd >= b.max_usd) {
    std::snprintf(text, sizeof(text), "$%.4g of budget.max_usd $%.4g", spend.usd, b.max_usd);
  }
  return text;
}

std::string spend_text(const BudgetConfig& b, const BudgetSpend& spend, int64_t steps_done, int64_t total_steps) {
  if (!b.limited() && b.usd_per_gpu_hour <= 0) return "";
  const double projected = steps_done > 0 ? spend.gpu_hours / static_cast<double>(steps_done) * static_cast<double>(total_steps) : 0;
  char text[96];
  if (b.usd_per_gpu_hour > 0) {
    std::snprintf(text, sizeof(text), "$%.4g / $%.4g projected", spend.usd, projected * b.usd_per_gpu_hour);
  } else {
    std::snprintf(text, sizeof(text), "%.3g / %.3g GPU-h projected", spend.gpu_hours, projected);
  }
  return text;
}

int64_t token_limit_steps(const BudgetConfig& b, int64_t tokens) { return b.max_tokens > 0 ? std::max<int64_t>(1, b.max_tokens / tokens) : 0; }

std::string token_limit_warning(const BudgetConfig& b, int64_t steps, int64_t tokens_per_step) {
  if (steps <= 0 || b.max_tokens <= 0 || b.max_tokens >= steps * tokens_per_step) return "";
  return "budget warning: " + std::to_string(steps * tokens_per_step) + " tokens planned, budget.max_tokens is " +
         std::to_string(b.max_tokens) + ": the run will stop near step " + std::to_string(b.max_tokens / tokens_per_step);
}

std::string projection_warning(const BudgetConfig& b, const BudgetSpend& spend, int64_t steps_done, int64_t steps) {
  if (steps <= 0 || steps_done <= 0 || (b.max_gpu_hours <= 0 && b.max_usd <= 0)) return "";
  const double projected = spend.gpu_hours / static_cast<double>(steps_done) * static_cast<double>(steps);
  if (!(b.max_gpu_hours > 0 && projected > b.max_gpu_hours) && !(b.max_usd > 0 && projected * b.usd_per_gpu_hour > b.max_usd)) return "";
  char text[200];
  std::snprintf(text, sizeof(text), "budget warning: projected %.4g GPU-hours ($%.4g) for %lld steps exceeds the budget", projected,
                projected * b.usd_per_gpu_hour, static_cast<long long>(steps));
  return text;
}

bool injected_calibration(const std::string& text, double& step_seconds, double& eval_seconds) {
  if (text.empty()) return false;
  if (std::sscanf(text.c_str(), "step=%lf,eval=%lf", &step_seconds, &eval_seconds) != 2 || !(step_seconds > 0) ||
      !(eval_seconds >= 0)) {
    throw std::runtime_error("FMOE_CALIBRATION: expected 'step=SECONDS,eval=SECONDS', got '" + text + "'");
  }
  return true;
}

}  // namespace fmoe::trainer
