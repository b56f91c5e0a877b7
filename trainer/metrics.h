// Progress reporting: the live progress line and the metrics JSONL (the peak
// GEMM throughput that MFU is measured against is in trainer/precision.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <fstream>
#include <string>

namespace fmoe::trainer {

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
