// Runs every rank's action list of a pipeline schedule in lockstep on given
// costs: an action starts when its rank is free and what it needs is done (the
// previous stage's forward, the next stage's backward, its own forward or input
// gradient; across ranks, after a communication time, or through the lowered
// receive). Reports the makespan, each rank's idle time and the bubble
// fraction, the peak number of micro-batch stages holding activations per rank,
// and, when no rank can move, the deadlock with the stuck actions named.
#pragma once

#include <string>
#include <vector>

#include "parallel/pipeline_schedule.h"

namespace fmoe::plan {

// The schedules are the parallel layer's (parallel/pipeline_schedule.h).
using parallel::PipeAction;
using parallel::PipelineSchedule;
using parallel::PipeOp;

// Seconds (or any unit) per action of one chunk; backward is the whole one (I + W).
struct PipeCosts {
  double forward = 1, backward = 2, input_grad = 1, weight_grad = 1;
  double comm = 0;  // from a send to its receive, across ranks
  // Optional, per stage: its actions cost this many times the above (stages
  // that hold more layers, or the head, cost more). Empty: every stage alike.
  std::vector<double> stage_scale;
};

struct PipeSpan {
  PipeAction action;
  double start = 0, end = 0;
};

struct PipeSimResult {
  double makespan = 0;
  std::vector<double> busy;            // compute time per rank
  std::vector<double> idle;            // makespan - busy, per rank
  double bubble_fraction = 0;          // idle over all ranks / (ranks x makespan)
  std::vector<int> peak_activations;   // per rank: most stages x micro-batches forwarded, backward not finished
  std::vector<std::vector<PipeSpan>> spans;  // per rank, compute actions in time order
  std::string deadlock;                // empty, or "deadlock: rank 0 waits at 0B1 for 1B1; ..."
};

PipeSimResult simulate(const PipelineSchedule& schedule, const PipeCosts& costs);

// The timeline as text: one row per rank, one 3-character cell per time unit
// (unit: the cheapest compute action), "F12" for a forward of micro-batch 12, "." idle.
std::string render_text(const PipelineSchedule& schedule, const PipeSimResult& result);

// The same timeline as an SVG picture (forwards blue, backwards and input
// gradients green, weight gradients orange, idle white).
std::string render_svg(const PipelineSchedule& schedule, const PipeSimResult& result);

}  // namespace fmoe::plan
