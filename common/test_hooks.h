// The environment variables that change what the code does, for tests and
// benchmarks: each is read here, once, into TestHooks, and nowhere else. They
// are not user settings (a config key is); docs/test-hooks.md lists them, and
// moe-launch forwards exactly these to the ranks (kTestHooks).
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

namespace fmoe::common {

struct TestHookInfo {
  std::string_view name;
  std::string_view effect;
};

// Every hook, with what it does: the one list the code, moe-launch and the docs share.
std::span<const TestHookInfo> test_hook_table();
bool is_test_hook(std::string_view name);

struct TestHooks {
  // Replacements of measurements: a run that takes one says "injected" where it prints or records the figure.
  std::string calibration;   // FMOE_CALIBRATION="step=S,eval=E": a budget-sized schedule's step and validation seconds
  std::string gemm_gflops;   // FMOE_GEMM_GFLOPS="bf16=R,fp32=R": the GEMM rates precision auto and MFU use
  // Faults and probes.
  int stall_rank = -1;                   // FMOE_STALL_RANK: this rank stops taking part ...
  int64_t stall_at_step = -1;            // FMOE_STALL_AT_STEP: ... at this step (it sleeps)
  int64_t slow_from_step = -1;           // FMOE_SLOW_STEPS="S:seconds[:E]": every step from S (to E, excluded) sleeps that long too
  double slow_step_seconds = 0;
  int64_t slow_until_step = -1;          // E; -1: to the end
  int crash_after_checkpoint_files = 0;  // FMOE_CRASH_AFTER_CHECKPOINT_FILES: _Exit(9) after this many files of a save; 0: never
  std::string dump_gradients;            // FMOE_DUMP_GRADIENTS: a folder for each rank's first-step reduced gradients
  // Paths forced for testing.
  bool host_staging = false;       // FMOE_HOST_STAGING=1: a CPU run's collectives through the host-staging layer
  bool test_host_staging = false;  // FMOE_TEST_HOST_STAGING=1: the same for the multi-rank GoogleTest binaries
  bool test_mpi_progress = false;  // FMOE_TEST_MPI_PROGRESS=1: the multi-rank GoogleTest binaries with the MPI progress thread
  bool p2p_issue_order = false;    // FMOE_P2P_ISSUE_ORDER=1: MPI point-to-point messages match in issue order (NCCL's rule)
  std::string grouped_mm;          // FMOE_GROUPED_MM=on|off: force the grouped-GEMM expert path on or off
  std::string profile;             // FMOE_PROFILE=trace.json: bench_step records its timed steps there
  // Speed switches, for measuring one path against the other.
  bool fused_cpu_kernels = true;          // FMOE_FUSED_CPU_KERNELS=0: CPU tensors take the unfused ATen compositions
  int64_t cpu_allocator_cache_mb = 4096;  // FMOE_CPU_ALLOCATOR_CACHE_MB: the caching CPU allocator's limit; 0: not installed
};

// From the environment as it is now (every call reads it again).
TestHooks read_test_hooks();
// Read once, at the first call; what the code uses.
const TestHooks& test_hooks();

}  // namespace fmoe::common
