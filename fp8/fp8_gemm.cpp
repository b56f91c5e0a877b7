#include "fp8/fp8_gemm.h"

#include <ATen/ATen.h>

#include <map>
#include <mutex>

#include "fp8/block_quant.h"

namespace fmoe::fp8 {
namespace {


BlockQuantOptions tiles(int64_t rows, int64_t cols) {
  BlockQuantOptions o;
  o.block_rows = rows;
  o.block_cols = cols;
  return o;
}

// ---- The native path: at::_scaled_mm with DeepSeek-style block scales (CUDA, sm_90).

// cuBLAS reads a 128 x 128 scale grid with a leading dimension of K/128 floats,
// which must be 16-byte aligned: K a multiple of 512 for B in blocks.
bool native_shapes_ok(int64_t m, int64_t n, int64_t k, bool b_blocks) {
  return m % kTile == 0 && n % kTile == 0 && k % (b_blocks ? 4 * kTile : kTile) == 0;
}

// out[M, N] = A[M, K] . B[N, K]^T on E4M3 codes. at::_scaled_mm takes B as the
// column-major [K, N] matrix and checks the scales against A and B^T:
//   A in 1 x 128 tiles: scale_a [M, K/128], outer-dim-major (strides [1, M]);
//   B in 128 x 128 blocks: scale_b [K/128, N/128] whose transpose is the
//     row-major [N/128, K/128] grid (strides [1, K/128]);
//   B in 1 x 128 tiles: scale_b [K/128, N] row-major (its transpose outer-dim-major).
at::Tensor scaled_mm_native(const at::Tensor& a, const at::Tensor& b, bool b_blocks, at::ScalarType out_dtype) {
  const BlockQuantized qa = quantize_blocks(a, tiles(1, kTile));
  const BlockQuantized qb = quantize_blocks(b, b_blocks ? tiles(kTile, kTile) : tiles(1, kTile));
  const at::Tensor scale_a = qa.scales.t().contiguous().t();
  const at::Tensor scale_b = b_blocks ? qb.scales.contiguous().t() : qb.scales.t().contiguous();
  return at::_scaled_mm(qa.codes.view(at::kFloat8_e4m3fn), qb.codes.view(at::kFloat8_e4m3fn).t(), scale_a, scale_b,
                        std::nullopt, std::nullopt, out_dtype);
}

// The same product emulated: what the native GEMM must reproduce.
at::Tensor scaled_mm_emulated(const at::Tensor& a, const at::Tensor& b, bool b_blocks) {
  return at::mm(quantize_rowwise(a), (b_blocks ? quantize_blockwise(b) : quantize_rowwise(b)).t());
}

struct Probe {
  bool native = false;
  at::ScalarType out_dtype = at::kFloat;  // what cuBLAS writes; widened to FP32 after
  std::string detail;
};

// Tries the native GEMM once per device against the emulation, in both operand
// layouts, writing FP32 and, where cuBLAS refuses FP32 output, BF16. Any error
// or a mismatch beyond the output's rounding selects the emulation, and the
// reason is kept for the log.
const Probe& probe(const at::Device& device) {
  static std::mutex mutex;
  static std::map<std::string, Probe> probes;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = probes.find(device.str());
  if (it != probes.end()) return it->second;
  Probe result;
  const auto options = at::TensorOptions().device(device);
  const at::Tensor a = at::randn({256, 512}, options), b = at::randn({384, 512}, options);
  std::string why;
  for (const at::ScalarType out_dtype : {at::kFloat, at::kBFloat16}) {
    const double tolerance = out_dtype == at::kFloat ? 1e-3 : 1e-2;
    try {
      double worst = 0;
      for (bool blocks : {true, false}) {
        const at::Tensor native = scaled_mm_native(a, b, blocks, out_dtype).to(at::kFloat);
        const at::Tensor emulated = scaled_mm_emulated(a, b, blocks);
        worst = std::max(worst, ((native - emulated).norm() / emulated.norm()).item<double>());
      }
      if (worst < tolerance) {
        result.native = true;
        result.out_dtype = out_dtype;
        result.detail = std::string("native at::_scaled_mm with 1x128 / 128x128 block scales, ") +
                        (out_dtype == at::kFloat ? "FP32" : "BF16") + " output";
        break;
      }
      why = "at::_scaled_mm disagrees with the emulation (relative error " + std::to_string(worst) + ")";
    } catch (const std::exception& e) {
      const std::string what = e.what();
      if (why.empty()) why = "at::_scaled_mm with block scales unavailable (" + what.substr(0, what.find('\n')) + ")";
    }
  }
  if (!result.native) result.detail = "emulated: " + why;
  return probes.emplace(device.str(), result).first->second;
}

}  // namespace

at::Tensor fp8_mm(const at::Tensor& a, const at::Tensor& b, bool b_blocks) {
  if (a.is_cuda() && native_shapes_ok(a.size(0), b.size(0), a.size(1), b_blocks)) {
    const Probe& native = probe(a.device());
    if (native.native) return scaled_mm_native(a, b, b_blocks, native.out_dtype).to(at::kFloat);
  }
  return scaled_mm_emulated(a, b, b_blocks);
}

at::Tensor quantize_rowwise(const at::Tensor& x) { return fake_quantize(x, tiles(1, kTile)); }
at::Tensor quantize_colwise(const at::Tensor& x) { return fake_quantize(x, tiles(kTile, 1)); }
at::Tensor quantize_blockwise(const at::Tensor& w) { return fake_quantize(w, tiles(kTile, kTile)); }

std::string fp8_gemm_backend(const at::Device& device) {
  if (!device.is_cuda()) return "emulated (FP32 GEMM on dequantized E4M3 operands; exact on CPU)";
  return probe(device).detail;
}

}  // namespace fmoe::fp8
