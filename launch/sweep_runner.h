// Running a sweep's trials (launch/sweep.h expands them): each an mpirun job
// of moe-train in its own run directory, several at once within a rank budget,
// or by successive halving over a spending budget; resumable (finished trials
// are skipped, interrupted ones resume from their checkpoints); summary.md,
// summary.csv and charts after every trial. moe-sweep is its command line.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "launch/sweep.h"

namespace fmoe::launch {

struct TrialRun {
  Trial trial;
  std::string dir;
  int64_t steps = 0;  // the trial's training.steps
  double usd_per_gpu_hour = 0;
  std::string state = "pending";  // pending | running | stopped | done | failed | pruned
  int64_t launches = 0;
  int64_t rung = 0;                // successive halving: the highest rung reached
  std::map<int64_t, double> rung_val;  // rung -> validation loss at its end
  TrialRecord record;
};

// A trial's trial.json: its state, launches, rung and each rung's validation
// loss. Read back, a trial left "running" (the sweep itself died) is "stopped",
// so the next run resumes it.
nlohmann::json trial_state_json(const TrialRun& t);
void restore_trial_state(TrialRun& t, const nlohmann::json& j);

// Successive halving's promotion at a rung's end: the members ordered by their
// validation loss at that rung (stable; a trial without one, or with a negative
// one, last), the first `keep` promoted and the rest not.
struct Promotion {
  std::vector<size_t> promoted, dropped;
};
Promotion promote(const std::vector<TrialRun>& runs, std::vector<size_t> members, int64_t rung, int64_t keep);

class SweepRunner {
 public:
  // stop: set by a signal handler; running trials are then stopped at a checkpoint.
  SweepRunner(SweepSpec spec, const std::atomic<bool>& stop);

  // Resolves every trial's config (a bad key or value fails here, naming it) and checks the out_dir.
  void prepare(bool dry_run);
  void print_trials() const;
  // Returns 0 when every trial finished (or the budget is spent), 1 when interrupted or a trial failed.
  int run();

 private:
  template <typename Target>
  void run_jobs(const std::vector<size_t>& queue, Target target);
  pid_t launch(TrialRun& t, int64_t until, const std::vector<std::string>& extra);
  void finish(TrialRun& t, int status);
  std::string amount(double value) const;
  double spent() const;
  int run_asha();
  void write_summary() const;

  SweepSpec spec_;
  const std::atomic<bool>& stop_;
  std::string train_;
  std::vector<TrialRun> runs_;
  std::vector<std::string> configs_;
  bool stop_sent_ = false;
};

}  // namespace fmoe::launch
