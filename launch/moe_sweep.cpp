// moe-sweep: runs the trials of a sweep file (launch/sweep_runner.h), each an
// mpirun job of moe-train in its own run directory, several at once within a
// rank budget, or by successive halving over a spending budget; resumable;
// writes summary.md, summary.csv and charts after every trial.
//
//   moe-sweep --sweep configs/sweeps/lr-aux.yaml [--dry-run]
#include <signal.h>

#include <atomic>
#include <cstdio>

#include "launch/cli.h"
#include "launch/plots.h"
#include "launch/sweep_runner.h"

using namespace fmoe::launch;

namespace {

std::atomic<bool> g_stop{false};
void on_signal(int) { g_stop = true; }

constexpr const char* kUsage =
    "usage: moe-sweep --sweep FILE [--dry-run]\n"
    "  Expands FILE's axes into trials under its out_dir and trains each with mpirun + moe-train; a rerun skips\n"
    "  finished trials and resumes interrupted ones. SIGINT / SIGTERM stop the running trials at a checkpoint.\n"
    "  --dry-run prints the trials and writes nothing.\n";

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args args = parse_args(argc, argv, 1, {"dry-run", "help"});
    if (const int code = check_usage(args, kUsage, {"sweep"}); code >= 0) return code;
    SweepRunner sweep(load_sweep(args.get("sweep")), g_stop);
    sweep.prepare(args.has("dry-run"));
    if (args.has("dry-run")) {
      sweep.print_trials();
      return 0;
    }
    require_gnuplot();
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    return sweep.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-sweep: error: %s\n", error_message(e).c_str());
    return 1;
  }
}
