// moe-train: trains the model a YAML config describes. Launch it with mpirun;
// every rank runs this same program (data parallel over all ranks).
//
//   mpirun -np 1 moe-train --config configs/tiny.yaml [--set a.b=c]... [--resume | --eval-only]
#include <csignal>
#include <cstdio>
#include <exception>
#include <filesystem>

#include "common/test_hooks.h"
#include "launch/cli.h"
#include "parallel/mpi/mpi_communicator.h"
#include "config/config.h"
#include "trainer/trainer.h"

namespace {

void on_signal(int) { fmoe::trainer::request_stop(); }

constexpr const char* kUsage =
    "usage: moe-train --config FILE [--set key.path=value]... [--resume[=CHECKPOINT] | --resume-if-present] [--stop-at STEP] [--eval-only] [--reshard]\n"
    "  --resume continues from the latest checkpoint (a damaged one is skipped for the newest earlier one, with a\n"
    "  warning); --resume=CHECKPOINT from that checkpoint directory only.\n"
    "  --resume-if-present resumes when the run directory has a checkpoint and starts fresh otherwise (batch\n"
    "  scripts that are requeued).\n"
    "  --eval-only validates the latest checkpoint's model under this layout and precision, writing nothing.\n"
    "  --reshard (with --resume) writes the checkpoint again under this run's layout into training.run_dir and exits:\n"
    "  the same step, the optimizer state resharded exactly, nothing trained.\n"
    "  --stop-at STEP saves a checkpoint and exits 0 after STEP steps (resume later with --resume).\n"
    "  SIGINT / SIGTERM finish the current step, save a checkpoint and exit 0.\n";

}  // namespace

int main(int argc, char** argv) {
  fmoe::launch::configure_allocator();
  fmoe::parallel::MpiRuntime mpi(&argc, &argv);
  const int rank = mpi.world_rank();
  try {
    const auto args = fmoe::launch::parse_args(argc, argv, 1, {"resume", "resume-if-present", "eval-only", "reshard", "help"});
    if (const int code = fmoe::launch::check_usage(args, kUsage, {"config"}); code >= 0) return code;
    const auto config = fmoe::config::load_config(args.get("config"), args.all("set"));
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    auto world = fmoe::parallel::make_mpi_world_communicator();
    fmoe::trainer::TrainerOptions options;
    options.resume = args.has("resume") ||
                     (args.has("resume-if-present") && std::filesystem::exists(config.training.run_dir + "/checkpoints/latest"));
    options.resume_path = args.get("resume");  // --resume=PATH: that checkpoint, no other
    options.eval_only = args.has("eval-only");
    options.reshard_only = args.has("reshard");
    if (options.reshard_only && !options.resume) {
      if (rank == 0) std::fputs("moe-train: error: --reshard needs --resume or --resume=CHECKPOINT\n", stderr);
      return 2;
    }
    if (args.has("stop-at")) options.stop_at_step = std::stoll(args.get("stop-at"));
    options.world = world.get();
    options.hooks = fmoe::common::test_hooks();
    fmoe::trainer::Trainer trainer(config, options);
    const auto result = trainer.run();
    if (rank == 0 && result.final_val_loss >= 0) {
      std::printf("done: step %lld, final val_loss %.4f\n", static_cast<long long>(result.final_step), result.final_val_loss);
    }
    return 0;
  } catch (const fmoe::config::ConfigError& e) {
    // Every rank reads the same config and fails the same way: one report, no abort.
    if (rank == 0) std::fprintf(stderr, "moe-train: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-train: error (rank %d): %s\n", rank, fmoe::launch::error_message(e).c_str());
    std::fflush(stderr);
    if (mpi.world_size() > 1) fmoe::parallel::MpiRuntime::abort(1);
    return 1;
  }
}
