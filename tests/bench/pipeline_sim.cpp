// The schedule simulator on measured costs, for scripts/bench_pipeline.sh:
//   pipeline_sim NAME PP V MICRO_BATCHES COMM F0,B0,W0 F1,B1,W1 ...
// with each rank's measured seconds per step in forwards (F), in whole backwards
// and input-gradient halves (B), and in deferred weight-gradient halves (W; 0
// for schedules that do not split). Per action costs come from the rank's
// counts of each action in the schedule: a whole backward costs I + W. The
// simulator takes the mean over ranks, each rank's stages scaled by its total.
// Prints the makespan and each rank's simulated idle fraction of the step.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "parallel/pipeline_schedule.h"
#include "plan/pipeline_sim.h"

int main(int argc, char** argv) {
  using namespace fmoe::parallel;
  using namespace fmoe::plan;
  if (argc < 7) {
    std::fprintf(stderr, "usage: pipeline_sim NAME PP V MICRO_BATCHES COMM F0,B0,W0 [F1,B1,W1 ...]\n");
    return 2;
  }
  const int pp = std::atoi(argv[2]), v = std::atoi(argv[3]), m = std::atoi(argv[4]);
  if (argc != 6 + pp) {
    std::fprintf(stderr, "pipeline_sim: expected %d F,B,W triples (one per rank)\n", pp);
    return 2;
  }
  try {
    const PipelineSchedule s = make_schedule(argv[1], pp, v, m);
    std::vector<double> total(static_cast<size_t>(pp));
    double mean_f = 0, mean_i = 0, mean_w = 0;
    for (int r = 0; r < pp; ++r) {
      double f = 0, b = 0, w = 0;
      if (std::sscanf(argv[6 + r], "%lf,%lf,%lf", &f, &b, &w) != 3) throw std::invalid_argument(std::string("bad F,B,W triple '") + argv[6 + r] + "'");
      int forwards = 0, wholes = 0, inputs = 0, weights = 0;
      for (const PipeAction& a : s.ranks[static_cast<size_t>(r)]) {
        forwards += a.op == PipeOp::kForward, wholes += a.op == PipeOp::kBackward;
        inputs += a.op == PipeOp::kInputGrad, weights += a.op == PipeOp::kWeightGrad;
      }
      // w = weights x W; b = wholes x (I + W) + inputs x I.
      const double weight = weights > 0 ? w / weights : 0;
      const double input = (b - wholes * weight) / (wholes + inputs);
      mean_f += f / forwards / pp, mean_i += input / pp, mean_w += weight / pp;
      total[static_cast<size_t>(r)] = f + b + w;
    }
    PipeCosts costs;
    costs.forward = mean_f;
    costs.input_grad = mean_i;
    costs.weight_grad = mean_w;
    costs.backward = mean_i + mean_w;
    costs.comm = std::atof(argv[5]);
    double mean_total = 0;
    for (double t : total) mean_total += t / pp;
    for (int stage = 0; stage < s.num_stages(); ++stage) {
      costs.stage_scale.push_back(total[static_cast<size_t>(s.stage_rank[static_cast<size_t>(stage)])] / mean_total);
    }
    const PipeSimResult result = simulate(s, costs);
    std::printf("makespan %.6f idle", result.makespan);
    for (double idle : result.idle) std::printf(" %.4f", idle / result.makespan);
    std::printf("\n");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "pipeline_sim: %s\n", e.what());
    return 1;
  }
  return 0;
}
