// Sizing a run to its budget. With training.steps: 0 the schedule's length is
// not given but derived, once: from max_tokens directly, or, for limits in time
// or money, from the step time measured over the first budget.calibration_steps
// and the time of one validation pass. The decision is stored in the
// checkpoint, so a resumed run follows the same schedule bit for bit. A fixed
// schedule that the recent step time would carry past the whole limit is
// shortened (shortened_schedule); one that it would end well inside the limit
// (the machine sped up again) is lengthened (lengthened_schedule); the new
// length is stored alike.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "config/config.h"

namespace fmoe::parallel {
class Communicator;
}

namespace fmoe::trainer {

using config::BudgetConfig;

// Of a time-sized schedule: this fraction of the budget is planned, the rest
// absorbs checkpoint writes and step-time drift on a shared machine (the tiny
// config's steps drifted 11% above their calibrated time over an 8-minute run).
inline constexpr double kBudgetPlannedFraction = 0.90;
// A fixed schedule projected to end below this fraction of the limit at the
// recent step time is lengthened (the gap to the planned fraction keeps one
// resize from triggering the next at a steady step time).
inline constexpr double kBudgetGrowBelowFraction = 0.80;

// The wall-clock seconds the budget allows the whole run (every rank counts as a
// device for GPU-hours and dollars); 0 when no limit is in time or money.
double budget_seconds(const BudgetConfig& budget, int world_size);

struct ScheduleInputs {
  double limit_seconds = 0;    // budget_seconds()
  double elapsed_seconds = 0;  // spent when the decision is taken (calibration included)
  int64_t decided_at_step = 0; // steps done at the decision
  double step_seconds = 0;     // measured mean step time
  double eval_seconds = 0;     // measured time of one validation pass
  int64_t eval_interval = 0;   // training.eval_interval (0: only at the end)
  int64_t token_limit_steps = 0;  // max_tokens / tokens per step; 0: none
  bool injected = false;       // the times came from FMOE_CALIBRATION, not the clock
};

// The total step count: the most steps whose time, with the validation passes
// they trigger and the final one, fits in the planned fraction of what is left;
// never fewer than decided_at_step + 1, never more than the token limit.
int64_t size_schedule(const ScheduleInputs& in);

// Of a schedule already fixed, with in's times measured now (elapsed, the recent
// step time, decided_at_step = the steps done): the seconds finishing it would
// take in all, validation passes and the final one included.
double projected_seconds(const ScheduleInputs& in, int64_t total_steps);

// A schedule whose projection outruns the whole limit (the planned fraction's
// slack used up: the machine slowed down since calibration) is shortened: to
// the steps that fit in the planned fraction of the time left at the recent
// step time, never longer than it was, never ending before the next step.
int64_t shortened_schedule(const ScheduleInputs& in, int64_t total_steps);

// A schedule whose projection ends below kBudgetGrowBelowFraction of the limit
// (the steps got faster: a passing slowdown that shortened it is over, or the
// calibration steps were slow) is lengthened: to the steps that fit, at the
// recent step time, in the planned fraction of the whole limit less the time
// spent (as size_schedule: a tenth of the limit stays free for drift), never
// shorter than it was, never past the token limit.
int64_t lengthened_schedule(const ScheduleInputs& in, int64_t total_steps);

// shortened_schedule past the limit, lengthened_schedule below
// kBudgetGrowBelowFraction of it, else total_steps.
int64_t resized_schedule(const ScheduleInputs& in, int64_t total_steps);

// Every rank must fix the same length, or the last steps' collectives would
// hang: all take the slowest rank's step, validation and elapsed times.
void agree_over_ranks(ScheduleInputs& in, parallel::Communicator& world);

// The line that announces a decision of size_schedule.
std::string describe_schedule(const ScheduleInputs& in, int64_t total_steps, int64_t max_tokens, int64_t tokens_per_step);

// The mean time of the calibration steps a schedule is sized from: the first
// two of a process warm caches up and are left out when there are more.
double calibrated_step_seconds(const std::vector<double>& step_seconds);

// The step time a fixed schedule is projected at: the median of the recent
// window (the mean of the middle two for an even count). A few outlying steps
// (the machine busy for a second) are already in the time spent and do not
// move it; a slowdown that lasts half the window does. 0 for an empty window.
double recent_step_seconds(std::vector<double> step_seconds);

// What a run has spent so far, against its limits.
struct BudgetSpend {
  double elapsed_seconds = 0;
  int64_t tokens_seen = 0;
  double gpu_hours = 0;
  double usd = 0;
};

// The first limit reached ("12.5 of budget.max_minutes 12 minutes"), or empty.
// A schedule sized by its budget (training.steps: 0) runs to its fixed end
// instead: its limits set its length, so they never cut it.
std::string budget_exhausted(const BudgetConfig& budget, const BudgetSpend& spend, bool sized_by_budget);

// "spent / projected" for the progress line, at the rate of the steps done so far; empty without a budget or a price.
std::string spend_text(const BudgetConfig& budget, const BudgetSpend& spend, int64_t steps_done, int64_t total_steps);

// The warning when configured steps will outrun a limit, or empty: before the
// run for a token limit, after some steps for GPU-hours or dollars projected at their rate.
std::string token_limit_warning(const BudgetConfig& budget, int64_t steps, int64_t tokens_per_step);
// budget.max_tokens in whole steps (at least 1), or 0 without a token limit.
int64_t token_limit_steps(const BudgetConfig& budget, int64_t tokens_per_step);
std::string projection_warning(const BudgetConfig& budget, const BudgetSpend& spend, int64_t steps_done, int64_t steps);

// "step=S,eval=E" (seconds; the FMOE_CALIBRATION test hook): replaces the
// measured times, so that tests can size a schedule deterministically. False
// for an empty text.
bool injected_calibration(const std::string& text, double& step_seconds, double& eval_seconds);

}  // namespace fmoe::trainer
