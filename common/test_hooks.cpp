#include "common/test_hooks.h"

#include <algorithm>
#include <array>
#include <cstdlib>
#include <stdexcept>

namespace fmoe::common {
namespace {

constexpr std::array<TestHookInfo, 15> kTestHooks{{
    {"FMOE_CALIBRATION", "step=S,eval=E: replaces the measured step and validation seconds of a budget-sized schedule "
                         "(and its clock), so that the step count is reproducible; the schedule line says injected"},
    {"FMOE_GEMM_GFLOPS", "bf16=R,fp32=R: replaces the measured GEMM rates that precision auto chooses by and MFU is "
                         "computed against; the precision line and the metrics say injected"},
    {"FMOE_STALL_RANK", "with FMOE_STALL_AT_STEP: that rank sleeps at that step, so its peers' collectives time out"},
    {"FMOE_STALL_AT_STEP", "the step at which FMOE_STALL_RANK stops taking part"},
    {"FMOE_SLOW_STEPS", "S:seconds[:E]: every step from S on (to E, excluded) sleeps that long too (a machine that slows down mid-run)"},
    {"FMOE_CRASH_AFTER_CHECKPOINT_FILES", "n: the process exits (_Exit(9)) after n files of a checkpoint save"},
    {"FMOE_DUMP_GRADIENTS", "dir: each rank writes its reduced first-step gradients to dir/gradients_rank<r>.safetensors"},
    {"FMOE_HOST_STAGING", "1: a CPU run's collectives go through the host-staging layer that carries CUDA tensors over MPI"},
    {"FMOE_TEST_HOST_STAGING", "1: the multi-rank GoogleTest binaries' collectives go through the host-staging layer"},
    {"FMOE_P2P_ISSUE_ORDER", "1: NCCL's point-to-point rules under MPI: messages between two ranks match in issue order, whatever their tags, a send completes once its receive is posted, and the pipeline sends and receives in groups"},
    {"FMOE_TEST_MPI_PROGRESS", "1: the multi-rank GoogleTest binaries run with the MPI progress thread driving every request"},
    {"FMOE_GROUPED_MM", "on|off: forces the grouped-GEMM expert path on (any device, checked against the loop) or off"},
    {"FMOE_PROFILE", "trace.json: bench_step records its timed steps with LibTorch's profiler there"},
    {"FMOE_FUSED_CPU_KERNELS", "0: CPU tensors take the unfused ATen compositions instead of the fused kernels (moe/cpu_kernels.h, fp8/fake_quant_cpu.h, FP4 coding in fp8/low_precision_tensor.cpp)"},
    {"FMOE_CPU_ALLOCATOR_CACHE_MB", "MiB: the caching CPU allocator's limit (default 4096); 0 keeps LibTorch's own allocator"},
}};

std::string text_of(const char* name) {
  const char* value = std::getenv(name);
  return value ? value : "";
}

// A whole decimal number, or the error naming the variable.
int64_t number_of(const char* name, int64_t unset) {
  const std::string text = text_of(name);
  if (text.empty()) return unset;
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (*end != '\0') throw std::runtime_error(std::string(name) + ": expected a whole number, got '" + text + "'");
  return value;
}

}  // namespace

std::span<const TestHookInfo> test_hook_table() { return kTestHooks; }

bool is_test_hook(std::string_view name) {
  return std::any_of(kTestHooks.begin(), kTestHooks.end(), [&](const TestHookInfo& h) { return h.name == name; });
}

TestHooks read_test_hooks() {
  TestHooks hooks;
  hooks.calibration = text_of("FMOE_CALIBRATION");
  hooks.gemm_gflops = text_of("FMOE_GEMM_GFLOPS");
  hooks.stall_rank = static_cast<int>(number_of("FMOE_STALL_RANK", -1));
  hooks.stall_at_step = number_of("FMOE_STALL_AT_STEP", -1);
  hooks.crash_after_checkpoint_files = static_cast<int>(number_of("FMOE_CRASH_AFTER_CHECKPOINT_FILES", 0));
  if (const std::string slow = text_of("FMOE_SLOW_STEPS"); !slow.empty()) {
    char* end = nullptr;
    hooks.slow_from_step = std::strtoll(slow.c_str(), &end, 10);
    if (*end == ':') hooks.slow_step_seconds = std::strtod(end + 1, &end);
    if (*end == ':') hooks.slow_until_step = std::strtoll(end + 1, &end, 10);
    if (*end != '\0' || hooks.slow_from_step < 0 || !(hooks.slow_step_seconds > 0) ||
        (hooks.slow_until_step != -1 && hooks.slow_until_step <= hooks.slow_from_step)) {
      throw std::runtime_error("FMOE_SLOW_STEPS: expected STEP:SECONDS[:END] (a step >= 0, seconds > 0, an end after the step), got '" +
                               slow + "'");
    }
  }
  hooks.dump_gradients = text_of("FMOE_DUMP_GRADIENTS");
  hooks.host_staging = text_of("FMOE_HOST_STAGING") == "1";
  hooks.test_host_staging = text_of("FMOE_TEST_HOST_STAGING") == "1";
  hooks.test_mpi_progress = text_of("FMOE_TEST_MPI_PROGRESS") == "1";
  hooks.p2p_issue_order = text_of("FMOE_P2P_ISSUE_ORDER") == "1";
  hooks.grouped_mm = text_of("FMOE_GROUPED_MM");
  if (!hooks.grouped_mm.empty() && hooks.grouped_mm != "on" && hooks.grouped_mm != "off") {
    throw std::runtime_error("FMOE_GROUPED_MM: expected on or off, got '" + hooks.grouped_mm + "'");
  }
  hooks.profile = text_of("FMOE_PROFILE");
  if (const std::string fused = text_of("FMOE_FUSED_CPU_KERNELS"); !fused.empty()) {
    if (fused != "0" && fused != "1") throw std::runtime_error("FMOE_FUSED_CPU_KERNELS: expected 0 or 1, got '" + fused + "'");
    hooks.fused_cpu_kernels = fused == "1";
  }
  hooks.cpu_allocator_cache_mb = number_of("FMOE_CPU_ALLOCATOR_CACHE_MB", 4096);
  if (hooks.cpu_allocator_cache_mb < 0) throw std::runtime_error("FMOE_CPU_ALLOCATOR_CACHE_MB: expected MiB >= 0, got a negative number");
  return hooks;
}

const TestHooks& test_hooks() {
  static const TestHooks hooks = read_test_hooks();
  return hooks;
}

}  // namespace fmoe::common
