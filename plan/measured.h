// A plan against a run: what moe-train measured for a config (its metrics.jsonl)
// set beside what make_plan predicts for the same config, term by term, so a
// user can see which part of the model is off on their machines (moe-plan
// --measured). Pure arithmetic over the metrics' numbers.
#pragma once

#include <string>
#include <vector>

#include "plan/plan.h"

namespace fmoe::plan {

// Rank 0's step lines of a run's metrics.jsonl, averaged over the steps after
// the first `skip` (warm-up: the allocator's cache, oneDNN's primitives).
struct MeasuredStep {
  std::string path;
  int64_t steps = 0;  // averaged
  double step = 0, compute = 0, communication = 0, optimizer = 0, data = 0;
  // Pipelined runs (the lines' "pipeline" times): per pipeline rank, the time
  // blocked on the pipeline's sends and receives, and the time in forwards and
  // backwards (input- and weight-gradient halves included).
  std::vector<double> pipeline_wait, pipeline_busy;
  // Expert-parallel runs (the lines' "expert_rank_imbalance"): the busiest expert
  // rank's routed tokens over the mean rank's, averaged over MoE layers and steps; 0 when absent.
  double expert_rank_imbalance = 0;
};

// Reads path (a metrics.jsonl, or a run directory holding one). Throws
// ConfigError naming the file (and line) for a missing file, a line that is
// not a step record, or no step left after `skip`.
MeasuredStep read_measured_step(const std::string& path, int64_t skip);

// One term of the step, planned and measured (seconds), and the planner's error.
struct TermComparison {
  std::string term;
  double planned = 0, measured = 0;
  bool priced = true;  // false: a measured term the planner does not model (data loading)
  double error() const { return measured > 0 ? planned / measured - 1 : 0; }
};

// The step's terms: compute (GEMMs and element-wise work), the time blocked in
// communication (what the assumed overlaps leave of it, plus the pipeline's
// idle time, which the runtime spends waiting on the pipeline's receives),
// the optimizer (its update and Muon's Newton-Schulz), data loading, and the
// step. For a pipelined run, also the idle fraction: planned (simulated) and
// measured (mean over pipeline ranks of blocked / busy time); for an
// expert-parallel one, the busiest expert rank's tokens over the mean rank's
// (the planner's moe_imbalance against the run's routing).
std::vector<TermComparison> compare(const Plan& plan, const MeasuredStep& measured);

// The comparison as a table, and as JSON ("terms": [{term, planned, measured, error}], "within": tolerance test).
std::string format_comparison(const Plan& plan, const MeasuredStep& measured, double tolerance);
std::string comparison_json(const Plan& plan, const MeasuredStep& measured, double tolerance);

}  // namespace fmoe::plan
