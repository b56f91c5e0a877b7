#include "fp8/fake_quant_cpu.h"

#include <ATen/Version.h>

#include "common/cpu_isa.h"


namespace fmoe::fp8 {

const FakeQuantKernel& fake_quant_kernel() {
  static const FakeQuantKernel& kernel = common::for_cpu_capability(at::get_cpu_capability(), fake_quant_isa::kernel_DEFAULT(),
                                                                    fake_quant_isa::kernel_AVX2(), fake_quant_isa::kernel_AVX512());
  return kernel;
}

}  // namespace fmoe::fp8
