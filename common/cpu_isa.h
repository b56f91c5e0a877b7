// Kernels compiled once per instruction set (CMake's fmoe_add_isa_objects:
// DEFAULT, AVX2, AVX512): which copy to run, and which copies this CPU can run.
#pragma once

#include <string_view>
#include <vector>

namespace fmoe::common {

// The copy matching `capability`, ATen's own choice for the CPU
// (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY lowers), so that our
// kernels and LibTorch's use the same instruction set.
template <class T>
const T& for_cpu_capability(std::string_view capability, const T& default_copy, const T& avx2_copy, const T& avx512_copy) {
  if (capability.starts_with("AVX512")) return avx512_copy;
  if (capability.starts_with("AVX2")) return avx2_copy;
  return default_copy;
}

// Whether this CPU can execute the copy built for `isa` (DEFAULT always): tests
// check every copy it can run, not only the one dispatched.
inline bool cpu_runs_isa(std::string_view isa) {
  if (isa == "DEFAULT") return true;
#if defined(__x86_64__)
  if (isa == "AVX2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (isa == "AVX512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq");
  }
#endif
  return false;
}

// The copies of a kernel table (with an `isa` name) that this CPU can execute.
template <class T>
std::vector<const T*> runnable_copies(const T& default_copy, const T& avx2_copy, const T& avx512_copy) {
  std::vector<const T*> copies;
  for (const T* copy : {&default_copy, &avx2_copy, &avx512_copy}) {
    if (cpu_runs_isa(copy->isa)) copies.push_back(copy);
  }
  return copies;
}

}  // namespace fmoe::common
