// Hyperparameter sweeps: a sweep file (a base config, overrides, and axes)
// expands to trials, each a run directory with its resolved config; the
// search either runs every trial to the end or spends a budget by successive
// halving (ASHA's rungs, promoted in order). Pure logic here; moe-sweep runs it.
//
//   base: ../tiny.yaml               the base config, relative to the sweep file
//   out_dir: runs/sweeps/lr-aux      where trial directories go
//   ranks: 1                         ranks per trial (one mpirun job each)
//   parallel_ranks: 2                ranks the sweep may use at once
//   set: {training.steps: 60}        overrides for every trial
//   axes:                            in order; grid axes multiply, random axes are drawn
//     optimizer.lr: {log_uniform: [1.0e-4, 1.0e-2]}
//     model.aux_loss_coeff: {grid: [0.0, 0.001]}
//     model.top_k: {choice: [1, 2]}
//     optimizer.min_lr: {uniform: [0.0, 1.0e-4]}
//   linked:                          values that vary together (one grid axis each)
//     - {training.micro_batch_size: [8, 16], optimizer.lr: [0.001, 0.002]}
//   random: {count: 4, seed: 1}      draws of the random axes per grid point
//   search:                          optional: successive halving over a budget
//     method: asha
//     min_steps: 10                  the first rung; each next one eta times longer
//     eta: 2
//     budget: {tokens: 2000000}      or gpu_hours / usd (the trainer's accounting)
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace fmoe::launch {

struct SweepAxis {
  std::string key;                  // a config key path (optimizer.lr)
  std::string kind;                 // grid | uniform | log_uniform | choice | linked
  std::vector<std::string> values;  // grid and choice values, as written
  double low = 0, high = 0;         // uniform and log_uniform
  std::vector<std::string> linked_keys;                // linked: the keys that move together
  std::vector<std::vector<std::string>> linked_values;  // linked: per key, its values
  bool random() const { return kind == "uniform" || kind == "log_uniform" || kind == "choice"; }
};

struct SweepSearch {
  std::string method = "all";  // all: every trial to the end | asha
  int64_t min_steps = 0;
  int64_t eta = 2;
  std::string budget_unit;     // tokens | gpu_hours | usd (asha)
  double budget = 0;
};

struct SweepSpec {
  std::string path;      // the sweep file
  std::string base;      // the base config, resolved against the sweep file's folder
  std::string out_dir;
  int64_t ranks = 1;
  int64_t parallel_ranks = 0;  // 0: ranks (one trial at a time)
  std::vector<std::string> mpirun_args{"--oversubscribe", "--bind-to", "none"};
  std::vector<std::string> overrides;  // "key=value" for every trial
  std::vector<SweepAxis> axes;         // axes, then linked groups, in file order
  int64_t random_count = 1;
  uint64_t seed = 1;
  SweepSearch search;
};

// Reads and checks a sweep file; throws std::runtime_error "FILE: key: why".
SweepSpec load_sweep(const std::string& path);

struct Trial {
  int64_t index = 0;
  std::string name;                           // trial_000
  std::vector<std::pair<std::string, std::string>> values;  // key -> value, in axis order
  std::vector<std::string> overrides() const;  // "key=value"
};

// Every trial: the product of the grid axes and linked groups (first axis
// slowest), each with random_count draws of the random axes. Draw d of grid
// point g uses its own stream of the seed, so the same file gives the same trials.
std::vector<Trial> expand(const SweepSpec& spec);

// A uniform double in [0, 1) from (seed, stream, counter): SplitMix64, the same on every machine.
double sweep_uniform(uint64_t seed, uint64_t stream, uint64_t counter);
// Values as written into configs: %.4g (what the summary shows is what ran).
std::string format_value(double value);

// Successive halving: rung r runs the survivors to min_steps * eta^r steps
// (the last rung: max_steps); of n trials at a rung, ceil(n / eta) go on.
struct Rung {
  int64_t steps = 0;
  int64_t trials = 0;
};
std::vector<Rung> asha_rungs(int64_t num_trials, int64_t min_steps, int64_t eta, int64_t max_steps);

// What a run directory's metrics say about a trial.
struct TrialRecord {
  int64_t steps = 0;             // last step recorded
  double final_val_loss = -1;    // the last validation (-1: none yet)
  double best_val_loss = -1;
  double final_loss = -1;
  int64_t tokens = 0;
  double gpu_hours = 0;
  double seconds = 0;            // training wall time (gpu_hours over the ranks)
  double tokens_per_second = 0;  // mean of the recorded steps
};
TrialRecord read_trial_record(const std::string& run_dir, int64_t ranks);

// A trial's spend in the budget's unit.
double spend_of(const TrialRecord& record, const std::string& unit, double usd_per_gpu_hour);

}  // namespace fmoe::launch
