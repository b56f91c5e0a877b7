// moe-ckpt: a run's checkpoints at a glance.
//
//   moe-ckpt list   RUN_DIR        every checkpoint: step, layout, size, which is latest; interrupted saves
//   moe-ckpt verify PATH           every file's CRC32 (a checkpoint, or every checkpoint of a run); exit 1 naming the first bad file
//   moe-ckpt show   PATH           one checkpoint (a run: its latest): step, tokens, layout, precision, size, tensors
#include <cstdio>
#include <exception>
#include <filesystem>

#include "launch/cli.h"
#include "checkpoint/checkpoint.h"

namespace {

using namespace fmoe;
namespace fs = std::filesystem;

constexpr const char* kUsage =
    "usage: moe-ckpt list RUN_DIR\n"
    "       moe-ckpt verify CHECKPOINT|RUN_DIR\n"
    "       moe-ckpt show CHECKPOINT|RUN_DIR\n";

bool is_checkpoint(const std::string& path) { return fs::exists(path + "/trainer_state.json"); }

double size_mb(const std::string& dir) {
  uintmax_t bytes = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.is_regular_file()) bytes += entry.file_size();
  }
  return static_cast<double>(bytes) / (1 << 20);
}

std::string latest_name(const std::string& run_dir) {
  try {
    if (const auto latest = checkpoint::latest_checkpoint(run_dir)) return fs::path(*latest).filename().string();
  } catch (const std::exception&) {
  }
  return "";
}

int list(const std::string& run_dir) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  if (!fs::is_directory(root)) throw std::runtime_error(root.string() + ": no checkpoints directory");
  const std::string latest = latest_name(run_dir);
  std::printf("%-22s %10s %12s %10s  %s\n", "checkpoint", "step", "tokens", "MiB", "layout");
  for (const std::string& dir : checkpoint::complete_checkpoints(run_dir)) {
    const std::string name = fs::path(dir).filename().string();
    try {
      const checkpoint::CheckpointContents c = checkpoint::load_checkpoint(dir);
      std::printf("%-22s %10lld %12lld %10.1f  %s%s\n", name.c_str(), static_cast<long long>(c.state.step),
                  static_cast<long long>(c.state.tokens_seen), size_mb(dir), c.layout.empty() ? "dp" : c.layout.c_str(),
                  name == latest ? "  (latest)" : "");
    } catch (const std::exception& e) {
      std::printf("%-22s damaged: %s\n", name.c_str(), launch::error_message(e).c_str());
    }
  }
  for (const auto& entry : fs::directory_iterator(root)) {
    const std::string name = entry.path().filename().string();
    if (entry.is_directory() && name.find(".tmp.") != std::string::npos) std::printf("%-22s an interrupted save (ignored by --resume)\n", name.c_str());
  }
  return 0;
}

int verify(const std::string& path) {
  const std::vector<std::string> dirs = is_checkpoint(path) ? std::vector<std::string>{path} : checkpoint::complete_checkpoints(path);
  if (dirs.empty()) throw std::runtime_error(path + ": no checkpoint to verify");
  int bad = 0;
  for (const std::string& dir : dirs) {
    try {
      checkpoint::verify_checkpoint(dir);
      std::printf("ok: %s\n", dir.c_str());
    } catch (const std::exception& e) {
      std::fprintf(stderr, "moe-ckpt: error: %s\n", launch::error_message(e).c_str());
      ++bad;
    }
  }
  return bad == 0 ? 0 : 1;
}

int show(const std::string& path) {
  std::string dir = path;
  if (!is_checkpoint(path)) {
    const auto latest = checkpoint::latest_checkpoint(path);
    if (!latest) throw std::runtime_error(path + ": neither a checkpoint nor a run directory with checkpoints/latest");
    dir = *latest;
  }
  const checkpoint::CheckpointContents c = checkpoint::load_checkpoint(dir);
  int64_t parameters = 0;
  for (const auto& [name, t] : c.model) parameters += t.numel();
  std::printf("checkpoint  %s\nstep        %lld\ntokens      %lld\nlayout      %s\nprecision   %s\nsize        %.1f MiB in %zu files\n"
              "model       %zu tensors, %.2fM values\noptimizer   %zu tensors on rank 0%s\n",
              dir.c_str(), static_cast<long long>(c.state.step), static_cast<long long>(c.state.tokens_seen),
              c.layout.empty() ? "dp" : c.layout.c_str(), c.state.precision.empty() ? "-" : c.state.precision.c_str(), size_mb(dir),
              c.checksums.size(), c.model.size(), parameters / 1e6, c.optimizer.size(),
              c.checksums.size() > 5 ? " (and one file per other rank)" : "");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || std::string(argv[1]) == "--help") {
    std::fputs(kUsage, argc == 2 && std::string(argv[1]) == "--help" ? stdout : stderr);
    return argc == 2 && std::string(argv[1]) == "--help" ? 0 : 2;
  }
  try {
    const std::string command = argv[1], path = argv[2];
    if (command == "list") return list(path);
    if (command == "verify") return verify(path);
    if (command == "show") return show(path);
    throw std::invalid_argument("unknown command '" + command + "' (list, verify, show)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe-ckpt: error: %s\n", launch::error_message(e).c_str());
    return 1;
  }
}
