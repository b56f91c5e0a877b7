// Progress reporting: the live progress line and the metrics JSONL (the peak
// GEMM throughput that MFU is measured against is in trainer/precision.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace fmoe::trainer {

std::string format_duration(double seconds);

struct ProgressLine {
  int64_t step = 0, total_steps = 0;
  double loss = 0, lr = 0, tokens_per_second = 0, mfu = 0, eta_seconds = 0;
  std::string spend;  // "spent / projected" when a budget is configured
  std::string format() const;
};

// Appends one JSON object per line. The file changes only by atomic
// replacement or by appending: a fresh run replaces it with an empty file, a
// resumed one with the records up to the resumed step (a torn last line from a
// crash dropped), then each record is appended. sync() makes what was written
// durable; a checkpoint calls it before it becomes the latest, so the records
// up to a checkpoint survive any crash after it.
class MetricsWriter {
 public:
  MetricsWriter(const std::string& path, int64_t resume_step);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;
  void write(const std::string& json_line);
  void sync();

 private:
  std::string path_;
  int fd_ = -1;
};

}  // namespace fmoe::trainer
