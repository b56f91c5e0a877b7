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

bool native_shapes_ok(int64_t m, int64_t n, int64_t k) { return m % kTile == 0 && n % kTile == 0 && k % kTile == 0; }

// out[M, N] = A[M, K] . B[N, K]^T on E4M3 codes: A in 1 x 128 tiles along K; B in
// 128 x 128 blocks (b_blocks) or 1 x 128 tiles along K. cuBLAS takes the 1 x 128
// scales outer-dim-major (stride [1, M]) and the 128 x 128 ones as [round_up(K/128, 4), N/128].
at::Tensor scaled_mm_native(const at::Tensor& a, const at::Tensor& b, bool b_blocks, at::ScalarType out_dtype) {
  const BlockQuantized qa = quantize_blocks(a, tiles(1, kTile));
  const BlockQuantized qb = quantize_blocks(b, b_blocks ? tiles(kTile, kTile) : tiles(1, kTile));
  const at::Tensor scale_a = qa.scales.t().contiguous().t();
  at::Tensor scale_b;
  if (b_blocks) {
    const int64_t k_blocks = qb.scales.size(1);
    const int64_t padded = (k_blocks + 3) / 4 * 4;
    scale_b = at::constant_pad_nd(qb.scales, {0, padded - k_blocks}, 1.0).t();
  } else {
    scale_b = qb.scales.t().contiguous().t();
  }
  return at::_scaled_mm(qa.codes.view(at::kFloat8_e4m3fn), qb.codes.view(at::kFloat8_e4m3fn).t(), scale_a, scale_b,
                        std::nullopt, std::nullopt, out_dtype);
}

// The same product emulated: what the native GEMM must reproduce.
at::Tensor scaled_mm_emulated(const at::Tensor& a, const at::Tensor& b, bool b_blocks) {
  return at::mm(quantize_rowwise(a), (b_blocks ? quantize_blockwise(b) : quantize_rowwise(b)).t());
}

struct Probe {
  bool native = false;
  std::string detail;
};

// Tries the native GEMM once per device against the emulation; any error or a
// mismatch selects the emulation, and the reason is kept for the log.
const Probe& probe(const at::Device& device) {
  static std::mutex mutex;
  static std::map<std::string, Probe> probes;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = probes.find(device.str());
  if (it != probes.end()) return it->second;
  Probe result;
  try {
    const auto options = at::TensorOptions().device(device);
    const at::Tensor a = at::randn({256, 384}, options), b = at::randn({256, 384}, options);
    double worst = 0;
    for (bool blocks : {true, false}) {
      const at::Tensor native = scaled_mm_native(a, b, blocks, at::kFloat);
      const at::Tensor emulated = scaled_mm_emulated(a, b, blocks);
      worst = std::max(worst, ((native - emulated).norm() / emulated.norm()).item<double>());
    }
    result.native = worst < 1e-3;
    result.detail = result.native ? "native at::_scaled_mm with 1x128 / 128x128 block scales"
                                  : "emulated: at::_scaled_mm disagrees with the emulation (relative error " + std::to_string(worst) + ")";
  } catch (const std::exception& e) {
    std::string why = e.what();
    why = why.substr(0, why.find('\n'));
    result.detail = "emulated: at::_scaled_mm with block scales unavailable (" + why + ")";
  }
  return probes.emplace(device.str(), result).first->second;
}

}  // namespace

at::Tensor fp8_mm(const at::Tensor& a, const at::Tensor& b, bool b_blocks) {
  if (a.is_cuda() && native_shapes_ok(a.size(0), b.size(0), a.size(1)) && probe(a.device()).native) {
    return scaled_mm_native(a, b, b_blocks, at::kFloat);
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
