// The training loop: config -> model, data, optimizer -> steps of gradient
// accumulation over micro-batches, data-parallel gradient averaging, clipping,
// AdamW, the router-bias update, periodic validation, metrics, checkpoints.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "common/test_hooks.h"
#include "config/config.h"

namespace fmoe::parallel {
class Communicator;
}

namespace fmoe::trainer {

using config::Config;

struct TrainerOptions {
  // Continue from the run's latest checkpoint; one that fails its checks (a
  // missing or damaged file) is skipped for the newest earlier complete one,
  // with a one-line warning naming the bad file.
  bool resume = false;
  // With resume: this checkpoint directory and no other (no fallback).
  std::string resume_path;
  // Stop (checkpoint, return) once this many steps are done, as on SIGTERM; 0: never.
  int64_t stop_at_step = 0;
  // Load the model of run_dir's latest checkpoint (written under any layout), run
  // validation under this run's layout and precision, write nothing.
  bool eval_only = false;
  // With resume: write the checkpoint again, under this run's layout, into this
  // run's run_dir (same step, optimizer state resharded), and train nothing.
  bool reshard_only = false;
  // Data-parallel group over all ranks; null means a single process.
  parallel::Communicator* world = nullptr;
  // The test hooks (docs/test-hooks.md): moe-train passes common::test_hooks(), read once from the environment.
  common::TestHooks hooks;
};

struct StepRecord {
  int64_t step = 0;  // 1-based: the optimizer step just completed
  double loss = 0;   // mean cross-entropy over the global batch
  double val_loss = -1;  // < 0 when not evaluated at this step
};

struct TrainResult {
  std::vector<StepRecord> steps;  // the steps run by this invocation
  int64_t final_step = 0;
  double final_val_loss = -1;
  bool stopped_early = false;  // a stop was requested (SIGINT / SIGTERM)
  double peak_rss_bytes = 0;   // the largest rank's peak resident set size
};

// Async-signal-safe: asks the loop to finish the current step, checkpoint, and return.
void request_stop();

class Trainer {
 public:
  Trainer(Config config, TrainerOptions options);
  ~Trainer();
  TrainResult run();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace fmoe::trainer
