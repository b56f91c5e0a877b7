// The CUDA E4M3 cast kernels against the CPU codec, exhaustively. Skips where
// there is no CUDA device; runs under scripts/gpu_check.sh on a GPU machine.
#include <gtest/gtest.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <vector>

#include "fp8/codec.h"
#include "fp8/cuda/cast_kernels.h"

namespace {

using namespace fmoe::fp8;

bool have_device() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

TEST(Fp8CudaCast, MatchesCpuCodec) {
  if (!have_device()) GTEST_SKIP() << "SKIPPED: no CUDA device";
  // Every finite E4M3 value, the midpoints between neighbours, and out-of-range values.
  std::vector<float> input;
  for (int code = 0; code < 256; ++code) {
    const float v = decode(static_cast<uint8_t>(code), Format::kE4M3);
    if (std::isnan(v)) continue;
    input.push_back(v);
    input.push_back(std::nextafter(v, INFINITY));
    input.push_back(std::nextafter(v, -INFINITY));
  }
  for (float v : {464.0f, 480.0f, 1e6f, -1e6f, 1e-12f}) input.push_back(v);
  const int64_t n = static_cast<int64_t>(input.size());
  float* d_in = nullptr;
  uint8_t* d_out = nullptr;
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_in), n * sizeof(float)), cudaSuccess);
  ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_out), n), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(d_in, input.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
  for (bool saturate : {true, false}) {
    ASSERT_EQ(cuda::launch_encode_e4m3(d_in, d_out, n, saturate, nullptr), cudaSuccess);
    std::vector<uint8_t> out(static_cast<size_t>(n));
    ASSERT_EQ(cudaMemcpy(out.data(), d_out, n, cudaMemcpyDeviceToHost), cudaSuccess);
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t expected = encode(input[i], Format::kE4M3, saturate ? Overflow::kSaturate : Overflow::kNonSaturating);
      EXPECT_EQ(out[i], expected) << "value " << input[i] << " saturate " << saturate;
    }
  }
  cudaFree(d_in);
  cudaFree(d_out);
}

}  // namespace
