#include "moe/cpu_kernels.h"

#include <ATen/Version.h>

#include "common/cpu_isa.h"
#include "common/test_hooks.h"

#include <string>

namespace fmoe::moe {

const CpuKernels& cpu_kernels() {
  static const CpuKernels& table = common::for_cpu_capability(at::get_cpu_capability(), cpu_isa::kernels_DEFAULT(), cpu_isa::kernels_AVX2(),
                                                              cpu_isa::kernels_AVX512());
  return table;
}

bool fused_cpu_kernels_enabled() { return common::test_hooks().fused_cpu_kernels; }

}  // namespace fmoe::moe
