#include "trainer/metrics.h"

#include <ATen/ATen.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <fcntl.h>
#include <unistd.h>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "common/file_util.h"

namespace fmoe::trainer {

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
  // total_steps 0: a budget-sized schedule still calibrating (its length is not known yet).
  const std::string total = total_steps > 0 ? std::to_string(total_steps) : "?";
  const std::string eta = total_steps > 0 ? format_duration(eta_seconds) : "calibrating";
  std::snprintf(text, sizeof(text), "step %lld/%s | loss %.4f | lr %.2e | %.0f tok/s | MFU %.1f%% | ETA %s",
                static_cast<long long>(step), total.c_str(), loss, lr, tokens_per_second, 100.0 * mfu, eta.c_str());
  return spend.empty() ? std::string(text) : std::string(text) + " | " + spend;
}

MetricsWriter::MetricsWriter(const std::string& path, int64_t resume_step) : path_(path) {
  std::string kept;
  if (resume_step >= 0 && std::filesystem::exists(path)) {
    std::istringstream lines(common::read_file(path));
    for (std::string line; std::getline(lines, line);) {
      try {
        if (nlohmann::json::parse(line).value("step", int64_t{0}) <= resume_step) kept += line + "\n";
      } catch (const nlohmann::json::exception&) {
        // A torn last line from a crash: drop it.
      }
    }
  }
  common::write_file_atomic(path, kept);  // never truncated in place: a crash leaves the old file or the new one
  fd_ = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC);
  if (fd_ < 0) throw std::runtime_error(path + ": cannot open the metrics file for appending");
}

MetricsWriter::~MetricsWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void MetricsWriter::write(const std::string& json_line) {
  const std::string line = json_line + "\n";
  // One write per record (O_APPEND): a crash leaves whole records and at most one torn last line.
  for (size_t done = 0; done < line.size();) {
    const ssize_t n = ::write(fd_, line.data() + done, line.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(path_ + ": cannot append to the metrics file (" + std::strerror(errno) + ")");
    }
    done += static_cast<size_t>(n);
  }
}

void MetricsWriter::sync() {
  if (::fsync(fd_) != 0) throw std::runtime_error(path_ + ": fsync failed (" + std::strerror(errno) + ")");
}

}  // namespace fmoe::trainer
