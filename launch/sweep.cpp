#include "launch/sweep.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <stdexcept>

namespace fmoe::launch {
namespace fs = std::filesystem;
namespace {

[[noreturn]] void bad(const std::string& path, const std::string& key, const std::string& why) {
  throw std::runtime_error(path + ": " + key + ": " + why);
}

std::string scalar(const YAML::Node& node, const std::string& path, const std::string& key) {
  if (!node.IsScalar()) bad(path, key, "expected a value");
  return node.as<std::string>();
}

double number(const YAML::Node& node, const std::string& path, const std::string& key) {
  const std::string text = scalar(node, path, key);
  try {
    size_t used = 0;
    const double value = std::stod(text, &used);
    if (used != text.size()) throw std::invalid_argument(text);
    return value;
  } catch (const std::exception&) {
    bad(path, key, "expected a number, got '" + text + "'");
  }
}

std::vector<std::string> list(const YAML::Node& node, const std::string& path, const std::string& key) {
  if (!node.IsSequence() || node.size() == 0) bad(path, key, "expected a non-empty list");
  std::vector<std::string> out;
  for (const auto& item : node) out.push_back(scalar(item, path, key));
  return out;
}

SweepAxis parse_axis(const std::string& key, const YAML::Node& node, const std::string& path) {
  if (!node.IsMap() || node.size() != 1) bad(path, "axes." + key, "expected one of {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {log_uniform: [lo, hi]}");
  SweepAxis axis;
  axis.key = key;
  axis.kind = node.begin()->first.as<std::string>();
  const YAML::Node& body = node.begin()->second;
  const std::string where = "axes." + key + "." + axis.kind;
  if (axis.kind == "grid" || axis.kind == "choice") {
    axis.values = list(body, path, where);
  } else if (axis.kind == "uniform" || axis.kind == "log_uniform") {
    if (!body.IsSequence() || body.size() != 2) bad(path, where, "expected [low, high]");
    axis.low = number(body[0], path, where);
    axis.high = number(body[1], path, where);
    if (!(axis.high > axis.low)) bad(path, where, "high must exceed low");
    if (axis.kind == "log_uniform" && !(axis.low > 0)) bad(path, where, "low must be > 0 on a log scale");
  } else {
    bad(path, "axes." + key, "unknown axis kind '" + axis.kind + "' (grid, choice, uniform, log_uniform)");
  }
  return axis;
}

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

double sweep_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
  const uint64_t x = splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ counter);
  return static_cast<double>(x >> 11) * 0x1.0p-53;
}

std::string format_value(double value) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.4g", value);
  return text;
}

std::vector<std::string> Trial::overrides() const {
  std::vector<std::string> out;
  for (const auto& [key, value] : values) out.push_back(key + "=" + value);
  return out;
}

SweepSpec load_sweep(const std::string& path) {
  YAML::Node root;
  try {
    root = YAML::LoadFile(path);
  } catch (const YAML::BadFile&) {
    throw std::runtime_error(path + ": cannot read the sweep file");
  } catch (const YAML::Exception& e) {
    throw std::runtime_error(path + ": not valid YAML (line " + std::to_string(e.mark.line + 1) + ")");
  }
  if (!root.IsMap()) throw std::runtime_error(path + ": expected a mapping");
  static const std::vector<std::string> known{"base", "out_dir", "ranks", "parallel_ranks", "mpirun_args", "set", "axes", "linked", "random", "search"};
  for (const auto& item : root) {
    const std::string key = item.first.as<std::string>();
    if (std::find(known.begin(), known.end(), key) == known.end()) bad(path, key, "unknown key");
  }
  SweepSpec spec;
  spec.path = path;
  if (!root["base"]) bad(path, "base", "missing (the base config)");
  spec.base = (fs::path(path).parent_path() / scalar(root["base"], path, "base")).lexically_normal().string();
  if (!fs::exists(spec.base)) bad(path, "base", spec.base + " does not exist");
  spec.out_dir = root["out_dir"] ? scalar(root["out_dir"], path, "out_dir") : "runs/sweeps/" + fs::path(path).stem().string();
  if (root["ranks"]) spec.ranks = static_cast<int64_t>(number(root["ranks"], path, "ranks"));
  if (spec.ranks < 1) bad(path, "ranks", "must be >= 1");
  spec.parallel_ranks = root["parallel_ranks"] ? static_cast<int64_t>(number(root["parallel_ranks"], path, "parallel_ranks")) : spec.ranks;
  if (spec.parallel_ranks < spec.ranks) bad(path, "parallel_ranks", "must be >= ranks (" + std::to_string(spec.ranks) + ")");
  if (root["mpirun_args"]) spec.mpirun_args = root["mpirun_args"].IsSequence() && root["mpirun_args"].size() == 0 ? std::vector<std::string>{} : list(root["mpirun_args"], path, "mpirun_args");
  if (root["set"]) {
    if (!root["set"].IsMap()) bad(path, "set", "expected a mapping of config keys to values");
    for (const auto& item : root["set"]) spec.overrides.push_back(item.first.as<std::string>() + "=" + scalar(item.second, path, "set." + item.first.as<std::string>()));
  }
  if (root["axes"]) {
    if (!root["axes"].IsMap()) bad(path, "axes", "expected a mapping of config keys to axes");
    for (const auto& item : root["axes"]) spec.axes.push_back(parse_axis(item.first.as<std::string>(), item.second, path));
  }
  if (root["linked"]) {
    if (!root["linked"].IsSequence()) bad(path, "linked", "expected a list of {key: [values...], ...} groups");
    int group = 0;
    for (const auto& node : root["linked"]) {
      const std::string where = "linked[" + std::to_string(group++) + "]";
      if (!node.IsMap() || node.size() < 2) bad(path, where, "expected two or more keys with value lists of one length");
      SweepAxis axis;
      axis.kind = "linked";
      for (const auto& item : node) {
        axis.linked_keys.push_back(item.first.as<std::string>());
        axis.linked_values.push_back(list(item.second, path, where + "." + axis.linked_keys.back()));
        if (axis.linked_values.back().size() != axis.linked_values.front().size()) {
          bad(path, where + "." + axis.linked_keys.back(), std::to_string(axis.linked_values.back().size()) + " values, the group's first key has " +
                                                            std::to_string(axis.linked_values.front().size()));
        }
      }
      axis.key = axis.linked_keys.front();
      spec.axes.push_back(std::move(axis));
    }
  }
  std::vector<std::string> seen;
  for (const SweepAxis& axis : spec.axes) {
    for (const std::string& key : axis.kind == "linked" ? axis.linked_keys : std::vector<std::string>{axis.key}) {
      if (std::find(seen.begin(), seen.end(), key) != seen.end()) bad(path, key, "swept twice");
      seen.push_back(key);
    }
  }
  if (root["random"]) {
    const YAML::Node& r = root["random"];
    if (!r.IsMap()) bad(path, "random", "expected {count: N, seed: S}");
    if (r["count"]) spec.random_count = static_cast<int64_t>(number(r["count"], path, "random.count"));
    if (r["seed"]) spec.seed = static_cast<uint64_t>(number(r["seed"], path, "random.seed"));
    if (spec.random_count < 1) bad(path, "random.count", "must be >= 1");
  }
  const bool any_random = std::any_of(spec.axes.begin(), spec.axes.end(), [](const SweepAxis& a) { return a.random(); });
  if (!any_random) spec.random_count = 1;
  if (root["search"]) {
    const YAML::Node& s = root["search"];
    if (!s.IsMap()) bad(path, "search", "expected {method: asha, min_steps: N, eta: E, budget: {tokens|gpu_hours|usd: X}}");
    spec.search.method = s["method"] ? scalar(s["method"], path, "search.method") : "asha";
    if (spec.search.method != "asha" && spec.search.method != "all") bad(path, "search.method", "must be asha or all, got '" + spec.search.method + "'");
    if (spec.search.method == "asha") {
      if (!s["min_steps"]) bad(path, "search.min_steps", "missing (the first rung's steps)");
      spec.search.min_steps = static_cast<int64_t>(number(s["min_steps"], path, "search.min_steps"));
      if (spec.search.min_steps < 1) bad(path, "search.min_steps", "must be >= 1");
      if (s["eta"]) spec.search.eta = static_cast<int64_t>(number(s["eta"], path, "search.eta"));
      if (spec.search.eta < 2) bad(path, "search.eta", "must be >= 2");
      if (!s["budget"] || !s["budget"].IsMap() || s["budget"].size() != 1) bad(path, "search.budget", "expected one of {tokens: N}, {gpu_hours: H}, {usd: D}");
      spec.search.budget_unit = s["budget"].begin()->first.as<std::string>();
      if (spec.search.budget_unit != "tokens" && spec.search.budget_unit != "gpu_hours" && spec.search.budget_unit != "usd") {
        bad(path, "search.budget", "unknown unit '" + spec.search.budget_unit + "' (tokens, gpu_hours, usd)");
      }
      spec.search.budget = number(s["budget"].begin()->second, path, "search.budget." + spec.search.budget_unit);
      if (!(spec.search.budget > 0)) bad(path, "search.budget." + spec.search.budget_unit, "must be > 0");
    }
  }
  return spec;
}

std::vector<Trial> expand(const SweepSpec& spec) {
  // Grid points: the product of grid axes and linked groups, the first one slowest.
  std::vector<std::vector<std::pair<std::string, std::string>>> points{{}};
  for (const SweepAxis& axis : spec.axes) {
    if (axis.random()) continue;
    std::vector<std::vector<std::pair<std::string, std::string>>> next;
    for (const auto& point : points) {
      const size_t n = axis.kind == "linked" ? axis.linked_values.front().size() : axis.values.size();
      for (size_t i = 0; i < n; ++i) {
        auto extended = point;
        if (axis.kind == "linked") {
          for (size_t k = 0; k < axis.linked_keys.size(); ++k) extended.emplace_back(axis.linked_keys[k], axis.linked_values[k][i]);
        } else {
          extended.emplace_back(axis.key, axis.values[i]);
        }
        next.push_back(std::move(extended));
      }
    }
    points = std::move(next);
  }
  std::vector<Trial> trials;
  for (size_t g = 0; g < points.size(); ++g) {
    for (int64_t d = 0; d < spec.random_count; ++d) {
      Trial trial;
      trial.index = static_cast<int64_t>(trials.size());
      char name[32];
      std::snprintf(name, sizeof(name), "trial_%03lld", static_cast<long long>(trial.index));
      trial.name = name;
      // Values in axis order: grid values from the point, random ones drawn.
      size_t grid_at = 0;
      uint64_t counter = 0;
      for (size_t a = 0; a < spec.axes.size(); ++a) {
        const SweepAxis& axis = spec.axes[a];
        if (!axis.random()) {
          const size_t width = axis.kind == "linked" ? axis.linked_keys.size() : 1;
          for (size_t k = 0; k < width; ++k) trial.values.push_back(points[g][grid_at++]);
          continue;
        }
        const double u = sweep_uniform(spec.seed, g * static_cast<uint64_t>(spec.random_count) + static_cast<uint64_t>(d), counter++);
        std::string value;
        if (axis.kind == "uniform") value = format_value(axis.low + u * (axis.high - axis.low));
        if (axis.kind == "log_uniform") value = format_value(std::exp(std::log(axis.low) + u * (std::log(axis.high) - std::log(axis.low))));
        if (axis.kind == "choice") value = axis.values[std::min(axis.values.size() - 1, static_cast<size_t>(u * static_cast<double>(axis.values.size())))];
        trial.values.emplace_back(axis.key, value);
      }
      trials.push_back(std::move(trial));
    }
  }
  return trials;
}

std::vector<Rung> asha_rungs(int64_t num_trials, int64_t min_steps, int64_t eta, int64_t max_steps) {
  std::vector<Rung> rungs;
  int64_t steps = std::min(min_steps, max_steps), trials = num_trials;
  while (true) {
    rungs.push_back({steps, trials});
    if (steps >= max_steps || trials <= 1) break;
    steps = std::min(max_steps, steps * eta);
    trials = (trials + eta - 1) / eta;
  }
  return rungs;
}

TrialRecord read_trial_record(const std::string& run_dir, int64_t ranks) {
  TrialRecord record;
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::string line;
  double tps_sum = 0;
  int64_t tps_count = 0;
  while (std::getline(in, line)) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception&) {
      continue;  // a torn last line of a killed run
    }
    record.steps = j.value("step", record.steps);
    record.final_loss = j.value("loss", record.final_loss);
    record.gpu_hours = j.value("gpu_hours", record.gpu_hours);
    record.tokens = j.value("tokens_seen", record.tokens);
    if (j.contains("tokens_per_second")) tps_sum += j["tokens_per_second"].get<double>(), ++tps_count;
    if (j.contains("val_loss")) {
      const double v = j["val_loss"].get<double>();
      record.final_val_loss = v;
      if (record.best_val_loss < 0 || v < record.best_val_loss) record.best_val_loss = v;
    }
  }
  record.seconds = record.gpu_hours * 3600.0 / static_cast<double>(std::max<int64_t>(1, ranks));
  record.tokens_per_second = tps_count > 0 ? tps_sum / static_cast<double>(tps_count) : 0;
  return record;
}

double spend_of(const TrialRecord& record, const std::string& unit, double usd_per_gpu_hour) {
  if (unit == "tokens") return static_cast<double>(record.tokens);
  if (unit == "gpu_hours") return record.gpu_hours;
  return record.gpu_hours * usd_per_gpu_hour;
}

}  // namespace fmoe::launch
