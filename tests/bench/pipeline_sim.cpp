// The schedule simulator on measured costs, for scripts/bench_pipeline.sh:
//   pipeline_sim NAME PP V MICRO_BATCHES COMM F0,B0 F1,B1 ...
// with each rank's forward and backward seconds per chunk and micro-batch.
// Prints each rank's simulated idle fraction of the step and the makespan.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "parallel/pipeline_schedule.h"
#include "parallel/pipeline_sim.h"

int main(int argc, char** argv) {
  using namespace fmoe::parallel;
  if (argc < 7) {
    std::fprintf(stderr, "usage: pipeline_sim NAME PP V MICRO_BATCHES COMM F0,B0 [F1,B1 ...]\n");
    return 2;
  }
  const int pp = std::atoi(argv[2]), v = std::atoi(argv[3]), m = std::atoi(argv[4]);
  if (argc != 6 + pp) {
    std::fprintf(stderr, "pipeline_sim: expected %d F,B pairs (one per rank)\n", pp);
    return 2;
  }
  try {
    const PipelineSchedule s = make_schedule(argv[1], pp, v, m);
    std::vector<double> forward, backward;
    double mean_f = 0, mean_b = 0;
    for (int r = 0; r < pp; ++r) {
      double f = 0, b = 0;
      if (std::sscanf(argv[6 + r], "%lf,%lf", &f, &b) != 2) throw std::invalid_argument(std::string("bad F,B pair '") + argv[6 + r] + "'");
      forward.push_back(f), backward.push_back(b);
      mean_f += f / pp, mean_b += b / pp;
    }
    PipeCosts costs;
    costs.forward = mean_f;
    costs.backward = mean_b;
    costs.comm = std::atof(argv[5]);
    for (int stage = 0; stage < s.num_stages(); ++stage) {
      const int r = s.stage_rank[static_cast<size_t>(stage)];
      costs.stage_scale.push_back((forward[static_cast<size_t>(r)] + backward[static_cast<size_t>(r)]) / (mean_f + mean_b));
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
