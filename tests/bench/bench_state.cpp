// The cost of storing optimizer state and gradients in a narrow dtype on the
// CPU: one store and load of a tensor the size of tiny's Muon matrices, per
// dtype, with the fused CPU pass and with the tensor composition CUDA takes
// (the same bits either way). Prints milliseconds per round trip (median of 5).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "fp8/low_precision_tensor.h"

namespace {

double median_ms(const at::Tensor& value, fmoe::fp8::StorageDtype dtype, bool stochastic) {
  std::vector<double> ms;
  for (int i = 0; i < 6; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fmoe::fp8::LowPrecisionTensor t(value.sizes(), dtype);
    if (stochastic) {
      t.store_stochastic(value, 7u + static_cast<uint32_t>(i));
    } else {
      t.store(value);
    }
    const at::Tensor back = t.load();
    const double elapsed = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    if (i > 0) ms.push_back(elapsed);  // the first warms the allocator
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t n = argc > 1 ? std::atoll(argv[1]) : int64_t{144} * 256 * 256;  // tiny: 3 layers x 16 experts x 3 matrices
  const at::Tensor value = at::randn({n / 256, 256}) * 1e-3;
  std::printf("optimizer state round trip (store + load) of %lld values, %d threads, ms (median of 5)\n",
              static_cast<long long>(n), at::get_num_threads());
  std::printf("%-24s %10s %14s\n", "dtype", "fused", "composition");
  using fmoe::fp8::StorageDtype;
  struct Row {
    const char* name;
    StorageDtype dtype;
    bool stochastic;
  };
  for (const Row& row : {Row{"bf16 stochastic", StorageDtype::kBf16, true}, Row{"fp8", StorageDtype::kFp8, false}, Row{"fp4", StorageDtype::kFp4, false},
                         Row{"fp4 stochastic", StorageDtype::kFp4, true}, Row{"nvfp4 stochastic", StorageDtype::kNvfp4, true},
                         Row{"fp6", StorageDtype::kFp6, false}}) {
    fmoe::fp8::use_codec_tensor_ops_on_cpu(false);
    const double fused = median_ms(value, row.dtype, row.stochastic);
    fmoe::fp8::use_codec_tensor_ops_on_cpu(true);
    const double composed = median_ms(value, row.dtype, row.stochastic);
    fmoe::fp8::use_codec_tensor_ops_on_cpu(false);
    std::printf("%-24s %10.1f %14.1f\n", row.name, fused, composed);
  }
  return 0;
}
