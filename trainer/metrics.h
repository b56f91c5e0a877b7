// Progress reporting: the live progress line, the metrics JSONL, and the peak
// GEMM throughput that MFU is measured against.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <fstream>
#include <string>

namespace fmoe::trainer {

// GFLOP/s of a square GEMM in dtype with the current intra-op threads: the
// peak this machine actually reaches, against which MFU is reported.
double measure_peak_gflops(at::ScalarType dtype, int64_t size = 2048);

std::string format_duration(double seconds);

struct ProgressLine {
  int64_t step = 0, total_steps = 0;
  double loss = 0, lr = 0, tokens_per_second = 0, mfu = 0, eta_seconds = 0;
  std::string spend;  // "spent / projected" when a budget is configured
  std::string format() const;
};

// Appends one JSON object per line; on resume, drops records after the resumed step.
class MetricsWriter {
 public:
  MetricsWriter(const std::string& path, int64_t resume_step);
  void write(const std::string& json_line);

 private:
  std::ofstream out_;
};

}  // namespace fmoe::trainer
