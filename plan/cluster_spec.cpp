#include "plan/plan.h"

#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

// Cluster specs (configs/clusters/*.yaml) and the planner's --assume settings.
namespace fmoe::plan {

using config::ConfigError;

void set_assumption(Assumptions& a, const std::string& key_value) {
  const size_t eq = key_value.find('=');
  const std::string key = key_value.substr(0, eq);
  const std::vector<std::pair<const char*, double*>> fields = {
      {"gemm_efficiency", &a.gemm_efficiency}, {"ep_overlap", &a.ep_overlap},         {"dp_overlap", &a.dp_overlap},
      {"tp_overlap", &a.tp_overlap},           {"moe_imbalance", &a.moe_imbalance}, {"memory_headroom", &a.memory_headroom},
      {"thread_efficiency", &a.thread_efficiency}};
  const auto it = std::find_if(fields.begin(), fields.end(), [&](const auto& f) { return key == f.first; });
  if (eq == std::string::npos || it == fields.end()) {
    throw ConfigError("--assume " + key_value + ": expected KEY=VALUE with KEY one of gemm_efficiency, ep_overlap, dp_overlap, "
                      "tp_overlap, moe_imbalance, memory_headroom, thread_efficiency");
  }
  double value = 0;
  try {
    size_t used = 0;
    value = std::stod(key_value.substr(eq + 1), &used);
    if (used != key_value.size() - eq - 1) throw std::invalid_argument("trailing text");
  } catch (const std::exception&) {
    throw ConfigError("--assume " + key + ": '" + key_value.substr(eq + 1) + "' is not a number");
  }
  const bool fraction = key == "gemm_efficiency" || key == "memory_headroom" || key == "thread_efficiency";
  const bool ok = key == "moe_imbalance" ? value >= 1 : fraction ? value > 0 && value <= 1 : value >= 0 && value <= 1;
  if (!ok) {
    throw ConfigError("--assume " + key + ": " + key_value.substr(eq + 1) + " is out of range (" +
                      (key == "moe_imbalance" ? ">= 1" : fraction ? "(0, 1]" : "[0, 1]") + ")");
  }
  *it->second = value;
}

ClusterSpec load_cluster(const std::string& name_or_path) {
  std::string path = name_or_path;
  if (!std::filesystem::exists(path)) path = "configs/clusters/" + name_or_path + ".yaml";
  if (!std::filesystem::exists(path)) {
    throw ConfigError(name_or_path + ": no such cluster spec (configs/clusters/ holds h800, h100-sxm, h200, a100-80gb, cpu-local)");
  }
  YAML::Node node;
  try {
    node = YAML::LoadFile(path);
  } catch (const YAML::Exception& e) {
    throw ConfigError(path + ":" + std::to_string(e.mark.line + 1) + ": YAML syntax error: " + e.msg);
  }
  ClusterSpec c;
  const std::vector<std::pair<const char*, double*>> numbers = {
      {"peak_bf16_tflops", &c.peak_bf16_tflops}, {"peak_fp8_tflops", &c.peak_fp8_tflops}, {"hbm_gib", &c.hbm_gib},
      {"hbm_tb_per_s", &c.hbm_tb_per_s},         {"intra_node_gb_per_s", &c.intra_node_gb_per_s},
      {"inter_node_gb_per_s", &c.inter_node_gb_per_s}, {"usd_per_gpu_hour", &c.usd_per_gpu_hour}};
  for (const auto& entry : node) {
    const std::string key = entry.first.as<std::string>();
    const auto where = path + ":" + std::to_string(entry.first.Mark().line + 1) + ": ";
    try {
      if (key == "name") {
        c.name = entry.second.as<std::string>();
      } else if (key == "device") {
        c.device = entry.second.as<std::string>();
        if (c.device != "gpu" && c.device != "cpu") throw ConfigError(where + "device: must be gpu or cpu");
      } else if (key == "runtime_gib") {
        c.runtime_gib = entry.second.as<double>();
        if (!(c.runtime_gib >= 0)) throw ConfigError(where + "runtime_gib: must be >= 0");
      } else if (key == "activation_overhead" || key == "activation_overhead_fp32") {
        double& overhead = key == "activation_overhead" ? c.activation_overhead : c.activation_overhead_fp32;
        overhead = entry.second.as<double>();
        if (!(overhead >= 1)) throw ConfigError(where + key + ": must be >= 1");
      } else if (key == "gpus_per_node") {
        c.gpus_per_node = entry.second.as<int64_t>();
      } else if (key == "cores_per_node") {
        c.cores_per_node = entry.second.as<int64_t>();
        if (c.cores_per_node < 1) throw ConfigError(where + "cores_per_node: must be >= 1");
      } else if (key == "collective_latency_us" || key == "oversubscribed_latency_us") {
        double& latency = key == "collective_latency_us" ? c.collective_latency_us : c.oversubscribed_latency_us;
        latency = entry.second.as<double>();
        if (!(latency >= 0)) throw ConfigError(where + key + ": must be >= 0");
      } else if (key == "assume") {
        if (!entry.second.IsMap()) throw ConfigError(where + "assume: expected a map of assumption: value");
        Assumptions check;
        for (const auto& item : entry.second) {
          const std::string setting = item.first.as<std::string>() + "=" + item.second.as<std::string>();
          try {
            set_assumption(check, setting);
          } catch (const ConfigError& e) {
            std::string why = e.what();
            why = why.rfind("--assume ", 0) == 0 ? why.substr(9) : why;
            throw ConfigError(where + "assume: " + why);
          }
          c.assume.push_back(setting);
        }
      } else {
        const auto it = std::find_if(numbers.begin(), numbers.end(), [&](const auto& n) { return key == n.first; });
        if (it == numbers.end()) throw ConfigError(where + "unknown key '" + key + "'");
        *it->second = entry.second.as<double>();
      }
    } catch (const YAML::Exception&) {
      throw ConfigError(where + key + ": expected a number");
    }
  }
  for (const auto& [key, value] : numbers) {
    if (!(*value > 0)) throw ConfigError(path + ": " + key + ": must be > 0");
  }
  if (c.gpus_per_node < 1) throw ConfigError(path + ": gpus_per_node: must be >= 1");
  if (c.device != "cpu" && (c.cores_per_node > 0 || c.oversubscribed_latency_us > 0)) {
    throw ConfigError(path + ": cores_per_node and oversubscribed_latency_us describe CPU nodes (device: cpu)");
  }
  if (c.name.empty()) c.name = std::filesystem::path(path).stem().string();
  return c;
}

}  // namespace fmoe::plan
