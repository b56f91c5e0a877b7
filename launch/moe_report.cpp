// moe-report: charts of any runs' metrics.jsonl — training loss, validation
// loss and throughput of all runs on one chart each, and per run a heatmap of
// expert load per MoE layer over the steps (the busiest expert's tokens over
// the mean: 1 is perfect balance).
//
//   moe-report RUN_DIR... [--out DIR]
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "launch/cli.h"
#include "launch/plots.h"

namespace fs = std::filesystem;
using namespace fmoe::launch;

namespace {

constexpr const char* kUsage =
    "usage: moe-report RUN_DIR... [--out DIR]\n"
    "  Writes loss.png, val_loss.png, throughput.png and expert_load_<run>.png (with their gnuplot scripts)\n"
    "  into DIR (default: the first run's report/).\n";

std::vector<nlohmann::json> read_metrics(const std::string& run_dir) {
  const std::string path = run_dir + "/metrics.jsonl";
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path + ": cannot read (is " + run_dir + " a run directory?)");
  std::vector<nlohmann::json> rows;
  std::string line;
  while (std::getline(in, line)) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_discarded() && j.contains("step")) rows.push_back(std::move(j));  // a torn last line is skipped
  }
  if (rows.empty()) throw std::runtime_error(path + ": no step recorded yet");
  return rows;
}

std::string run_name(const std::string& run_dir) {
  const fs::path p = fs::path(run_dir).lexically_normal();
  return (p.filename().empty() ? p.parent_path().filename() : p.filename()).string();
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Args args = parse_args(argc, argv, 1, {"help"});
    if (const int code = check_usage(args, kUsage, {}, /*positional_allowed=*/true); code >= 0) return code;
    require_gnuplot();
    const std::string out = args.get("out", (fs::path(args.positional.front()) / "report").string());
    fs::create_directories(out);
    std::vector<Series> loss, val, throughput;
    for (const std::string& dir : args.positional) {
      const std::vector<nlohmann::json> rows = read_metrics(dir);
      const std::string name = run_name(dir);
      Series l{name, {}, false}, v = l, t = l;
      for (const nlohmann::json& r : rows) {
        const double step = r["step"].get<double>();
        if (r.contains("loss")) l.points.emplace_back(step, r["loss"].get<double>());
        if (r.contains("val_loss")) v.points.emplace_back(step, r["val_loss"].get<double>());
        if (r.contains("tokens_per_second")) t.points.emplace_back(step, r["tokens_per_second"].get<double>());
      }
      loss.push_back(std::move(l));
      val.push_back(std::move(v));
      throughput.push_back(std::move(t));
      // Expert load: max over mean tokens per expert, per MoE layer, per step.
      std::vector<double> steps;
      std::vector<std::vector<double>> load;
      for (const nlohmann::json& r : rows) {
        if (!r.contains("expert_load_max") || !r.contains("expert_load_mean")) continue;
        const auto& mx = r["expert_load_max"];
        const auto& mean = r["expert_load_mean"];
        if (load.empty()) load.resize(mx.size());
        steps.push_back(r["step"].get<double>());
        for (size_t layer = 0; layer < load.size() && layer < mx.size(); ++layer) {
          const double m = mean[layer].get<double>();
          load[layer].push_back(m > 0 ? mx[layer].get<double>() / m : std::numeric_limits<double>::quiet_NaN());
        }
      }
      if (!load.empty()) {
        std::vector<std::string> layers;
        for (size_t i = 0; i < load.size(); ++i) layers.push_back("MoE layer " + std::to_string(i));
        draw_heatmap(out + "/expert_load_" + name + ".png",
                     {"Expert load, " + name + ": busiest expert's tokens / mean (1 = balanced)", "step", ""}, layers, steps, load);
      }
    }
    draw_lines(out + "/loss.png", {"Training loss", "step", "loss"}, loss);
    draw_lines(out + "/val_loss.png", {"Validation loss", "step", "validation loss"}, val);
    draw_lines(out + "/throughput.png", {"Throughput", "step", "tokens / s"}, throughput);
    std::printf("moe-report: charts of %zu run%s in %s\n", args.positional.size(), args.positional.size() > 1 ? "s" : "", out.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-report: error: %s\n", error_message(e).c_str());
    return 1;
  }
}
