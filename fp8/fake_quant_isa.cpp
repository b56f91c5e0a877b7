// fp8/fake_quant_cpu.h's kernel for one instruction set (CPU_CAPABILITY).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fp8/fake_quant_cpu.h"

#ifndef CPU_CAPABILITY
#error "compile fp8/fake_quant_isa.cpp with -DCPU_CAPABILITY=<DEFAULT|AVX2|AVX512>"
#endif

namespace fmoe::fp8::fake_quant_isa {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kMaxE4M3 = 448.0f;

inline Vec load(const float* p, int64_t n) { return n >= kLanes ? Vec::loadu(p) : Vec::loadu(p, static_cast<int>(n)); }
inline void store(float* p, int64_t n, const Vec& v) {
  if (n >= kLanes) {
    v.store(p);
  } else {
    v.store(p, static_cast<int>(n));
  }
}

// max that keeps a NaN, as ATen's amax does.
inline float nan_max(float a, float b) { return std::isnan(a) || std::isnan(b) ? std::numeric_limits<float>::quiet_NaN() : std::max(a, b); }

// q (already within +-448) rounded to the nearest E4M3 value, ties to even. The
// step of E4M3 values around |q| is 2^(e - 3) for |q| in [2^e, 2^(e+1)), and
// 2^-9 below the smallest normal 2^-6. Adding and subtracting M = step * 2^23
// rounds |q| to a multiple of the step in FP32's own round-to-nearest-even
// (|q| < 16 steps < M, so |q| + M has exactly that ulp); NaN stays NaN.
inline Vec round_e4m3(const Vec& q) {
  const Vec magnitude = q.abs();
  const Vec exponent_only = magnitude & Vec(std::numeric_limits<float>::infinity());  // 2^e (0 for FP32 subnormals)
  const Vec step = at::vec::maximum(exponent_only, Vec(0.015625f)) * Vec(0.125f);
  const Vec m = step * Vec(8388608.0f);
  const Vec rounded = (magnitude + m) - m;
  return rounded | (q & Vec(-0.0f));  // the sign of q
}

void e4m3(const float* x, float* y, int64_t batch, int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols) {
  const int64_t row_blocks = (rows + block_rows - 1) / block_rows;
  const int64_t col_blocks = (cols + block_cols - 1) / block_cols;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, block_rows * cols));
  at::parallel_for(0, batch * row_blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> column_max(static_cast<size_t>(cols)), column_scale(static_cast<size_t>(cols));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / row_blocks, r0 = (task % row_blocks) * block_rows, r1 = std::min(rows, r0 + block_rows);
      const float* xb = x + b * rows * cols;
      float* yb = y + b * rows * cols;
      // Each column's max |x| over the block's rows.
      std::fill(column_max.begin(), column_max.end(), 0.0f);
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = 0; c < cols; c += kLanes) {
          const int64_t n = std::min(kLanes, cols - c);
          store(column_max.data() + c, n, at::vec::maximum(load(column_max.data() + c, n), load(xb + r * cols + c, n).abs()));
        }
      }
      // Each block's scale, spread over its columns.
      for (int64_t j = 0; j < col_blocks; ++j) {
        const int64_t c0 = j * block_cols, c1 = std::min(cols, c0 + block_cols);
        float amax = 0.0f;
        int64_t c = c0;
        if (block_cols % kLanes == 0) {
          Vec m(0.0f);
          for (; c + kLanes <= c1; c += kLanes) m = at::vec::maximum(m, Vec::loadu(column_max.data() + c));
          amax = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
        }
        for (; c < c1; ++c) amax = nan_max(amax, column_max[static_cast<size_t>(c)]);
        const float scale = amax > 0.0f ? amax / kMaxE4M3 : 1.0f;
        std::fill(column_scale.begin() + c0, column_scale.begin() + c1, scale);
      }
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t c = 0; c < cols; c += kLanes) {
          const int64_t n = std::min(kLanes, cols - c);
          const Vec scale = load(column_scale.data() + c, n);
          const Vec q = at::vec::clamp(load(xb + r * cols + c, n) / scale, Vec(-kMaxE4M3), Vec(kMaxE4M3));
          store(yb + r * cols + c, n, round_e4m3(q) * scale);
        }
      }
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY

#define FMOE_FAKE_QUANT_NAME_(prefix, isa) prefix##isa
#define FMOE_FAKE_QUANT_NAME(prefix, isa) FMOE_FAKE_QUANT_NAME_(prefix, isa)
#define FMOE_FAKE_QUANT_STRING_(x) #x
#define FMOE_FAKE_QUANT_STRING(x) FMOE_FAKE_QUANT_STRING_(x)

const FakeQuantKernel& FMOE_FAKE_QUANT_NAME(kernel_, CPU_CAPABILITY)() {
  static const FakeQuantKernel kernel{FMOE_FAKE_QUANT_STRING(CPU_CAPABILITY), CPU_CAPABILITY::e4m3};
  return kernel;
}

}  // namespace fmoe::fp8::fake_quant_isa
