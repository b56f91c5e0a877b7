#include "plan/measured.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <nlohmann/json.hpp>
#include <sstream>

namespace fmoe::plan {

MeasuredStep read_measured_step(const std::string& path, int64_t skip) {
  MeasuredStep m;
  m.path = std::filesystem::is_directory(path) ? (std::filesystem::path(path) / "metrics.jsonl").string() : path;
  std::ifstream in(m.path);
  if (!in) throw ConfigError(m.path + ": cannot read the run's metrics");
  std::string text;
  int64_t line_number = 0, seen = 0;
  std::vector<double> wait, busy;
  double imbalance = 0;
  int64_t imbalance_steps = 0;
  while (std::getline(in, text)) {
    ++line_number;
    if (text.empty()) continue;
    const auto where = m.path + ":" + std::to_string(line_number) + ": ";
    nlohmann::json line;
    try {
      line = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception&) {
      throw ConfigError(where + "not a JSON line");
    }
    if (!line.is_object() || !line.contains("step_seconds") || !line.contains("time")) continue;  // validation, schedule lines
    if (++seen <= skip) continue;
    try {
      const auto& time = line.at("time");
      m.step += line.at("step_seconds").get<double>();
      m.compute += time.at("compute").get<double>();
      m.communication += time.at("communication").get<double>();
      m.optimizer += time.at("optimizer").get<double>();
      m.data += time.at("data").get<double>();
      if (line.contains("expert_rank_imbalance")) {
        const auto& layers = line.at("expert_rank_imbalance");
        const auto number = [](const nlohmann::json& v) { return v.is_number(); };
        if (!layers.is_array() || layers.empty() || !std::all_of(layers.begin(), layers.end(), number)) throw ConfigError(where + "expert_rank_imbalance: expected one number per MoE layer");
        double sum = 0;
        for (const auto& v : layers) sum += v.get<double>();
        imbalance += sum / static_cast<double>(layers.size());
        ++imbalance_steps;
      }
      if (line.contains("pipeline")) {
        const auto& p = line.at("pipeline");
        const auto& w = p.at("wait_seconds");
        if (wait.empty()) wait.assign(w.size(), 0), busy.assign(w.size(), 0);
        if (w.size() != wait.size()) throw ConfigError(where + "pipeline: the number of pipeline ranks changed");
        for (size_t r = 0; r < w.size(); ++r) {
          wait[r] += w[r].get<double>();
          busy[r] += p.at("forward_seconds")[r].get<double>() + p.at("backward_seconds")[r].get<double>() +
                     p.at("weight_seconds")[r].get<double>();
        }
      }
    } catch (const nlohmann::json::exception&) {
      throw ConfigError(where + "a step line without numeric step_seconds and time.{compute, communication, optimizer, data}");
    }
    ++m.steps;
  }
  if (m.steps == 0) {
    throw ConfigError(m.path + ": " + std::to_string(seen) + " step lines, none left after skipping the first " + std::to_string(skip));
  }
  const double n = static_cast<double>(m.steps);
  for (double* v : {&m.step, &m.compute, &m.communication, &m.optimizer, &m.data}) *v /= n;
  if (imbalance_steps > 0) m.expert_rank_imbalance = imbalance / static_cast<double>(imbalance_steps);
  for (size_t r = 0; r < wait.size(); ++r) {
    m.pipeline_wait.push_back(wait[r] / n);
    m.pipeline_busy.push_back(busy[r] / n);
  }
  return m;
}

std::vector<TermComparison> compare(const Plan& p, const MeasuredStep& m) {
  std::vector<TermComparison> terms = {
      {"compute", p.compute_seconds, m.compute},
      {"blocked in communication", p.comm_exposed_seconds + p.compute_seconds * p.bubble_fraction, m.communication},
      {"optimizer", p.optimizer_seconds + p.newton_schulz_seconds, m.optimizer},
      {"data", 0, m.data, false},
      {"step", p.step_seconds, m.step},
  };
  if (!m.pipeline_wait.empty()) {
    const double wait = std::accumulate(m.pipeline_wait.begin(), m.pipeline_wait.end(), 0.0);
    const double busy = std::accumulate(m.pipeline_busy.begin(), m.pipeline_busy.end(), 0.0);
    terms.push_back({"pipeline idle / busy", p.bubble_fraction, busy > 0 ? wait / busy : 0});
  }
  if (p.expert_rank_imbalance > 0 && m.expert_rank_imbalance > 0) {
    terms.push_back({"busiest expert rank / mean", p.expert_rank_imbalance, m.expert_rank_imbalance});
  }
  return terms;
}

namespace {

bool within(const std::vector<TermComparison>& terms, double tolerance) {
  for (const auto& t : terms) {
    if (t.term == "step") return std::abs(t.error()) <= tolerance;
  }
  return false;
}

}  // namespace

std::string format_comparison(const Plan& p, const MeasuredStep& m, double tolerance) {
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof(line), "against the run (%s, mean of %lld steps)\n  %-26s %12s %12s %8s\n", m.path.c_str(),
                static_cast<long long>(m.steps), "term", "planned", "measured", "error");
  out << line;
  const std::vector<TermComparison> terms = compare(p, m);
  for (const auto& t : terms) {
    const bool fraction = t.term == "pipeline idle / busy";
    if (!t.priced) {
      std::snprintf(line, sizeof(line), "  %-26s %12s %10.4g s %8s\n", t.term.c_str(), "-", t.measured, "");
    } else if (t.term == "busiest expert rank / mean") {
      std::snprintf(line, sizeof(line), "  %-26s %11.2fx %11.2fx %+7.1f%%\n", t.term.c_str(), t.planned, t.measured, 100 * t.error());
    } else if (fraction) {
      std::snprintf(line, sizeof(line), "  %-26s %11.1f%% %11.1f%% %+7.1f%%\n", t.term.c_str(), 100 * t.planned, 100 * t.measured,
                    100 * t.error());
    } else {
      std::snprintf(line, sizeof(line), "  %-26s %10.4g s %10.4g s %+7.1f%%\n", t.term.c_str(), t.planned, t.measured, 100 * t.error());
    }
    out << line;
  }
  std::snprintf(line, sizeof(line), "step within %.0f%% of the measured one: %s\n", 100 * tolerance,
                within(terms, tolerance) ? "yes" : "no");
  out << line;
  return out.str();
}

std::string comparison_json(const Plan& p, const MeasuredStep& m, double tolerance) {
  const std::vector<TermComparison> terms = compare(p, m);
  nlohmann::json rows = nlohmann::json::array();
  for (const auto& t : terms) {
    nlohmann::json row = {{"term", t.term}, {"measured", t.measured}};
    if (t.priced) row["planned"] = t.planned, row["error"] = t.error();
    rows.push_back(row);
  }
  const nlohmann::json j = {{"metrics", m.path}, {"steps", m.steps}, {"terms", rows}, {"tolerance", tolerance},
                            {"within", within(terms, tolerance)}};
  return j.dump(2);
}

}  // namespace fmoe::plan
