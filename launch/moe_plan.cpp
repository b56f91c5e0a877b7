// moe-plan: prices a run before it starts.
//
//   moe-plan --config FILE --cluster NAME [--gpus G] [--tokens N] [--global-batch SEQS]
//            [--mfu X] [--search [--top K]] [--json] [--schedule FILE.svg] [--set key.path=value]...
//            [--measured RUN_DIR|metrics.jsonl [--skip N] [--tolerance X]]
#include <cstdio>
#include <exception>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>

#include "launch/cli.h"
#include "config/config.h"
#include "parallel/pipeline_schedule.h"
#include "plan/measured.h"
#include "plan/pipeline_sim.h"
#include "plan/plan.h"

namespace {

using namespace fmoe;

constexpr const char* kUsage =
    "usage: moe-plan --config FILE --cluster NAME|FILE [--gpus G] [--tokens N] [--global-batch SEQUENCES]\n"
    "                [--mfu X] [--assume KEY=VALUE]... [--search [--top K]] [--json] [--schedule FILE.svg]\n"
    "                [--set key.path=value]... [--measured RUN_DIR|metrics.jsonl [--skip N] [--tolerance X]]\n"
    "  The layout comes from the config's parallel section (dp = gpus / (tp x pp)) and\n"
    "  --gpus defaults to what it needs (tp x pp x dp, or tp x pp x ep where dp is 0);\n"
    "  training.micro_batch_size x grad_accum_steps; --global-batch sets the accumulation.\n"
    "  --mfu X also prices the tokens at a given model-FLOPs utilisation. --search ranks\n"
    "  every layout that fits by cost. --schedule FILE.svg prints the pipeline schedule\n"
    "  (parallel.pipeline_schedule) simulated on the plan's times and draws it in FILE.svg.\n"
    "  --assume replaces one of the printed assumptions: gemm_efficiency, ep_overlap,\n"
    "  dp_overlap, tp_overlap, moe_imbalance, memory_headroom. --measured sets the plan\n"
    "  beside a run of the same config (moe-train's metrics.jsonl, its step lines after\n"
    "  the first N = 2 averaged): compute, time blocked in communication, optimizer,\n"
    "  data and step, planned and measured, and whether the step is within X = 0.15.\n";

double to_number(const std::string& text, const std::string& option) {
  try {
    size_t used = 0;
    const double value = std::stod(text, &used);
    if (used == text.size() && value > 0) return value;
  } catch (const std::exception&) {
  }
  throw config::ConfigError("--" + option + ": expected a positive number, got '" + text + "'");
}

// Without --gpus: the count the config's layout runs on, tp x pp x dp, where a
// dp left to the world size (0) is taken at its smallest, ep (experts are
// sharded over ep ranks carved out of dp); 8 for a layout of one rank.
int64_t gpus_the_layout_needs(const config::Config& config) {
  const auto& p = config.parallel;
  const int64_t dp = p.dp > 0 ? p.dp : std::max<int64_t>(1, p.ep);
  const int64_t needed = p.tp * p.pp * dp;
  return needed > 1 ? needed : 8;
}

}  // namespace

// --schedule FILE: the layout's pipeline schedule simulated on this plan's
// per-chunk times, as a text timeline here and an SVG picture in FILE.
void show_schedule(const plan::Plan& p, const std::string& svg_path) {
  const plan::Layout& l = p.layout;
  if (l.pp == 1) {
    std::printf("schedule: pp 1, no pipeline to show\n");
    return;
  }
  const parallel::PipelineSchedule schedule = parallel::make_schedule(
      plan::resolved_schedule(l), static_cast<int>(l.pp), static_cast<int>(l.virtual_pp), static_cast<int>(l.num_micro_batches));
  const plan::PipeSimResult r = plan::simulate(schedule, plan::chunk_costs(p));
  std::printf("schedule %s, pp %lld, v %lld, %lld micro-batches per step: %.4g s of pipeline, %.1f%% of it idle\n%s",
              schedule.name.c_str(), static_cast<long long>(l.pp), static_cast<long long>(l.virtual_pp),
              static_cast<long long>(l.num_micro_batches), r.makespan, 100 * r.bubble_fraction, plan::render_text(schedule, r).c_str());
  std::ofstream out(svg_path);
  out << plan::render_svg(schedule, r);
  if (!out) throw std::runtime_error(svg_path + ": cannot write the schedule picture");
  std::printf("picture: %s\n", svg_path.c_str());
}

int main(int argc, char** argv) {
  try {
    const auto args = launch::parse_args(argc, argv, 1, {"search", "json", "help"});
    if (args.has("help")) {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (!args.has("config") || !args.has("cluster") || !args.positional.empty()) {
      std::fputs(kUsage, stderr);
      return 2;
    }
    config::Config config = config::load_config(args.get("config"), args.all("set"));
    const plan::ClusterSpec cluster = plan::load_cluster(args.get("cluster"));
    const int64_t gpus = args.has("gpus") ? static_cast<int64_t>(to_number(args.get("gpus"), "gpus")) : gpus_the_layout_needs(config);
    if (!args.has("gpus") && !args.has("search") && !args.has("json")) {
      std::printf("gpus: %lld, what the config's layout needs (%s); --gpus prices another count\n", static_cast<long long>(gpus),
                  config.parallel.dp > 0 ? "tp x pp x dp" : "tp x pp x ep: dp left to the world size, at its smallest, ep");
    }
    const double tokens = to_number(args.get("tokens", "1e12"), "tokens");
    plan::Assumptions assumptions;
    for (const std::string& assume : cluster.assume) plan::set_assumption(assumptions, assume);  // the cluster's, then the command line's
    for (const std::string& assume : args.all("assume")) plan::set_assumption(assumptions, assume);
    plan::Layout layout = plan::layout_from_config(config, gpus);
    if (args.has("search")) {
      const auto global = args.has("global-batch") ? static_cast<int64_t>(to_number(args.get("global-batch"), "global-batch"))
                                                   : layout.micro_batch_size * layout.num_micro_batches * layout.dp;
      const auto plans = plan::search_plans(config, cluster, gpus, global, tokens, assumptions);
      if (plans.empty()) throw config::ConfigError("no layout of " + std::to_string(gpus) + " x " + cluster.name + " fits this model");
      const auto top = std::min(plans.size(), static_cast<size_t>(to_number(args.get("top", "10"), "top")));
      if (args.has("json")) {
        std::printf("[\n");
        for (size_t i = 0; i < top; ++i) {
          std::printf("%s%s\n", plan::plan_json(plans[i], cluster, assumptions).c_str(), i + 1 < top ? "," : "");
        }
        std::printf("]\n");
        return 0;
      }
      std::printf("%zu layouts fit on %lld x %s; cheapest first:\n", plans.size(), static_cast<long long>(gpus), cluster.name.c_str());
      std::printf("  %-50s %10s %9s %7s %12s %12s\n", "layout", "memory", "step", "MFU", "GPU-hours", "cost");
      for (size_t i = 0; i < top; ++i) {
        const auto& p = plans[i];
        std::printf("  %-50s %6.1f GiB %7.2f s %6.1f%% %12.4g  $%.4g\n", p.layout.describe().c_str(), p.memory.total() / (1 << 30),
                    p.step_seconds, 100 * p.mfu, p.gpu_hours, p.usd);
      }
      return 0;
    }
    if (layout.gpus() != gpus) {
      throw config::ConfigError("parallel: tp x pp x dp = " + std::to_string(layout.gpus()) + " does not use the " +
                                 std::to_string(gpus) + " GPUs given by --gpus; pass --gpus " + std::to_string(layout.gpus()) +
                                 " or change parallel.dp");
    }
    if (args.has("global-batch")) {
      const auto sequences = static_cast<int64_t>(to_number(args.get("global-batch"), "global-batch"));
      const int64_t per_micro = layout.micro_batch_size * layout.dp;
      if (sequences % per_micro != 0) {
        throw config::ConfigError("--global-batch: " + std::to_string(sequences) + " sequences is not a multiple of micro_batch_size x dp = " +
                                   std::to_string(per_micro));
      }
      layout.num_micro_batches = sequences / per_micro;
      config.training.grad_accum_steps = layout.num_micro_batches;
    }
    const plan::Plan plan = plan::make_plan(config, cluster, layout, tokens, assumptions);
    std::optional<plan::MeasuredStep> measured;
    double tolerance = 0.15;
    if (args.has("measured")) {
      const std::string skip = args.get("skip", "2");
      if (skip.empty() || skip.size() > 9 || skip.find_first_not_of("0123456789") != std::string::npos) {
        throw config::ConfigError("--skip: expected a whole number >= 0, got '" + skip + "'");
      }
      measured = plan::read_measured_step(args.get("measured"), std::stoll(skip));
      tolerance = to_number(args.get("tolerance", "0.15"), "tolerance");
    } else if (args.has("skip") || args.has("tolerance")) {
      throw config::ConfigError("--skip and --tolerance go with --measured");
    }
    if (args.has("json")) {
      nlohmann::json j = nlohmann::json::parse(plan::plan_json(plan, cluster, assumptions));
      if (measured) j["against_run"] = nlohmann::json::parse(plan::comparison_json(plan, *measured, tolerance));
      std::printf("%s\n", j.dump(2).c_str());
      return 0;
    }
    std::fputs(plan::format_plan(plan, cluster, assumptions).c_str(), stdout);
    if (measured) std::fputs(plan::format_comparison(plan, *measured, tolerance).c_str(), stdout);
    if (args.has("schedule")) show_schedule(plan, args.get("schedule"));
    if (args.has("mfu")) {
      const double mfu = to_number(args.get("mfu"), "mfu");
      const double peak = (config.precision.fp8 ? cluster.peak_fp8_tflops : cluster.peak_bf16_tflops) * 1e12;
      const double gpu_hours = plan.flops_per_token * tokens / (mfu * peak) / 3600.0;
      std::printf("at MFU %.1f%% instead\n  %-34s %.4g\n  %-34s $%.4g\n", 100 * mfu, "GPU-hours", gpu_hours, "cost",
                  gpu_hours * cluster.usd_per_gpu_hour);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-plan: error: %s\n", launch::error_message(e).c_str());
    return 1;
  }
}
