// The CUDA FP8 cast kernels against the CPU codec, for both formats and both
// overflow modes, on every code's value, its float neighbours and midpoints.
// Skips where there is no CUDA device; runs under scripts/gpu_check.sh.
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

std::vector<float> probe_values(Format format) {
  std::vector<float> values;
  for (int code = 0; code < 256; ++code) {
    const float v = decode(static_cast<uint8_t>(code), format);
    if (!std::isfinite(v)) continue;
    values.push_back(v);
    values.push_back(std::nextafter(v, INFINITY));
    values.push_back(std::nextafter(v, -INFINITY));
    const float next = decode(static_cast<uint8_t>(code + 1), format);
    if (std::isfinite(next)) values.push_back((v + next) / 2);
  }
  for (float v : {464.0f, 480.0f, 61440.0f, 1e6f, -1e6f, 1e-12f}) values.push_back(v);
  return values;
}

TEST(Fp8CudaCast, MatchesCpuCodec) {
  if (!have_device()) GTEST_SKIP() << "SKIPPED: no CUDA device";
  for (Format format : {Format::kE4M3, Format::kE5M2}) {
    const std::vector<float> input = probe_values(format);
    const int64_t n = static_cast<int64_t>(input.size());
    float* d_in = nullptr;
    float* d_back = nullptr;
    uint8_t* d_out = nullptr;
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_in), n * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_back), n * sizeof(float)), cudaSuccess);
    ASSERT_EQ(cudaMalloc(reinterpret_cast<void**>(&d_out), n), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(d_in, input.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    for (bool saturate : {true, false}) {
      ASSERT_EQ(cuda::launch_encode(d_in, d_out, n, format, saturate, nullptr), cudaSuccess);
      std::vector<uint8_t> out(static_cast<size_t>(n));
      ASSERT_EQ(cudaMemcpy(out.data(), d_out, n, cudaMemcpyDeviceToHost), cudaSuccess);
      for (int64_t i = 0; i < n; ++i) {
        const uint8_t expected = encode(input[i], format, saturate ? Overflow::kSaturate : Overflow::kNonSaturating);
        if (std::isnan(decode(expected, format))) {
          EXPECT_TRUE(std::isnan(decode(out[i], format))) << input[i];
        } else {
          EXPECT_EQ(out[i], expected) << "value " << input[i] << " format " << int(format) << " saturate " << saturate;
        }
      }
      ASSERT_EQ(cuda::launch_decode(d_out, d_back, n, format, nullptr), cudaSuccess);
      std::vector<float> back(static_cast<size_t>(n));
      ASSERT_EQ(cudaMemcpy(back.data(), d_back, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
      for (int64_t i = 0; i < n; ++i) {
        const float expected = decode(out[i], format);
        if (!std::isnan(expected)) {
          EXPECT_EQ(back[i], expected) << int(out[i]);
        }
      }
    }
    cudaFree(d_in);
    cudaFree(d_back);
    cudaFree(d_out);
  }
}

}  // namespace
