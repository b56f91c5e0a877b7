#include "fp8/fake_quant_cpu.h"

#include <ATen/Version.h>

#include <string>

namespace fmoe::fp8 {

const FakeQuantKernel& fake_quant_kernel() {
  static const FakeQuantKernel& kernel = []() -> const FakeQuantKernel& {
    const std::string isa = at::get_cpu_capability();
    if (isa.rfind("AVX512", 0) == 0) return fake_quant_isa::kernel_AVX512();
    if (isa.rfind("AVX2", 0) == 0) return fake_quant_isa::kernel_AVX2();
    return fake_quant_isa::kernel_DEFAULT();
  }();
  return kernel;
}

}  // namespace fmoe::fp8
