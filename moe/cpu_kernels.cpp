#include "moe/cpu_kernels.h"

#include <ATen/Version.h>

#include "common/test_hooks.h"

#include <string>

namespace fmoe::moe {

const CpuKernels& cpu_kernels() {
  // ATen's own choice for this CPU (ATEN_CPU_CAPABILITY lowers it), so our
  // kernels and LibTorch's run the same instruction set.
  static const CpuKernels& table = [] () -> const CpuKernels& {
    const std::string isa = at::get_cpu_capability();
    if (isa.rfind("AVX512", 0) == 0) return cpu_isa::kernels_AVX512();
    if (isa.rfind("AVX2", 0) == 0) return cpu_isa::kernels_AVX2();
    return cpu_isa::kernels_DEFAULT();
  }();
  return table;
}

bool fused_cpu_kernels_enabled() {
  static const bool enabled = common::test_hooks().fused_cpu_kernels;
  return enabled;
}

}  // namespace fmoe::moe
