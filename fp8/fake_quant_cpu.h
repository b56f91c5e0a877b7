// Fake quantization to OCP E4M3 of CPU tensors in one kernel: per block of
// block_rows x block_cols, scale = max|x| / 448 (1 where the block is all zero),
// then y = round_e4m3(clamp(x / scale, -448, 448)) * scale, rounding to nearest
// even, subnormals included. The same arithmetic, in the same order, as the
// ATen composition in block_quant.cpp (divide, saturate, LibTorch's float8 cast
// and back, multiply), so the two agree bit for bit; one pass to take each
// block's maximum and one to write it, vectorised with at::vec and parallel
// over row blocks. fp8/fake_quant_isa.cpp is compiled once per instruction set;
// fake_quant_kernel() picks the copy ATen itself runs (at::get_cpu_capability()).
#pragma once

#include <cstdint>

namespace fmoe::fp8 {

struct FakeQuantKernel {
  const char* isa;
  // x, y: [batch, rows, cols] FP32, contiguous; partial blocks at the edges are
  // scaled by what they hold, as if zero-padded.
  void (*e4m3)(const float* x, float* y, int64_t batch, int64_t rows, int64_t cols, int64_t block_rows, int64_t block_cols);
};

const FakeQuantKernel& fake_quant_kernel();

namespace fake_quant_isa {
const FakeQuantKernel& kernel_DEFAULT();
const FakeQuantKernel& kernel_AVX2();
const FakeQuantKernel& kernel_AVX512();
}  // namespace fake_quant_isa

}  // namespace fmoe::fp8
