#include "trainer/metrics.h"

#include <ATen/ATen.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "data/file_util.h"

namespace fmoe::trainer {

double measure_peak_gflops(at::ScalarType dtype, int64_t size) {
  const at::Tensor a = at::randn({size, size}).to(dtype);
  const at::Tensor b = at::randn({size, size}).to(dtype);
  at::Tensor c = at::mm(a, b);  // warm up kernels and caches
  double best = 0;
  // Best of five short rounds: robust to a noisy neighbour, still well under a second.
  for (int round = 0; round < 5; ++round) {
    const int reps = 2;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) at::mm_out(c, a, b);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, 2.0 * static_cast<double>(size * size * size) * reps / seconds / 1e9);
  }
  return best;
}

std::string format_duration(double seconds) {
  const auto total = static_cast<int64_t>(seconds + 0.5);
  char text[32];
  if (total >= 3600) {
    std::snprintf(text, sizeof(text), "%lldh%02lldm", static_cast<long long>(total / 3600), static_cast<long long>(total / 60 % 60));
  } else {
    std::snprintf(text, sizeof(text), "%lldm%02llds", static_cast<long long>(total / 60), static_cast<long long>(total % 60));
  }
  return text;
}

std::string ProgressLine::format() const {
  char text[256];
  std::snprintf(text, sizeof(text), "step %lld/%lld | loss %.4f | lr %.2e | %.0f tok/s | MFU %.1f%% | ETA %s",
                static_cast<long long>(step), static_cast<long long>(total_steps), loss, lr, tokens_per_second,
                100.0 * mfu, format_duration(eta_seconds).c_str());
  return spend.empty() ? std::string(text) : std::string(text) + " | " + spend;
}

MetricsWriter::MetricsWriter(const std::string& path, int64_t resume_step) {
  std::string kept;
  if (resume_step >= 0 && std::filesystem::exists(path)) {
    std::istringstream lines(data::read_file(path));
    for (std::string line; std::getline(lines, line);) {
      try {
        if (nlohmann::json::parse(line).value("step", int64_t{0}) <= resume_step) kept += line + "\n";
      } catch (const nlohmann::json::exception&) {
        // A torn last line from a crash: drop it.
      }
    }
  }
  out_.open(path, std::ios::trunc);
  if (!out_) throw std::runtime_error(path + ": cannot open the metrics file for writing");
  out_ << kept;
  out_.flush();
}

void MetricsWriter::write(const std::string& json_line) {
  out_ << json_line << '\n';
  out_.flush();
}

}  // namespace fmoe::trainer
