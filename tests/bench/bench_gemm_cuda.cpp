// FP8 against BF16 GEMM throughput on a GPU, at n^3 for the sizes given (default
// 4096 and 8192): BF16 at::mm; FP8 (E4M3) at::_scaled_mm with one scale per
// tensor, and with DeepSeek-V3's 1 x 128 / 128 x 128 block scales (what the
// trainer's FP8 linear uses). Each rate is the best of 10 products after 3
// warm-ups, timed with a device synchronisation around each. Prints one line per
// size; without a GPU it prints SKIPPED. Run by scripts/gpu_check.sh.
#include <ATen/ATen.h>
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

namespace {

double best_tflops(int64_t n, const std::function<void()>& product) {
  for (int i = 0; i < 3; ++i) product();
  torch::cuda::synchronize();
  double best = 0;
  for (int i = 0; i < 10; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    product();
    torch::cuda::synchronize();
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * static_cast<double>(n) * static_cast<double>(n) * static_cast<double>(n) / seconds / 1e12);
  }
  return best;
}

// A rate, or why there is none.
std::string attempt(int64_t n, const std::function<void()>& product) {
  try {
    char text[32];
    std::snprintf(text, sizeof(text), "%.0f", best_tflops(n, product));
    return text;
  } catch (const std::exception& e) {
    std::string why = e.what();
    return "n/a (" + why.substr(0, why.find('\n')).substr(0, 80) + ")";
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (!torch::cuda::is_available()) {
    std::printf("SKIPPED: no CUDA device\n");
    return 0;
  }
  const at::Device cuda(at::kCUDA, 0);
  std::vector<int64_t> sizes;
  for (int i = 1; i < argc; ++i) sizes.push_back(std::atoll(argv[i]));
  if (sizes.empty()) sizes = {4096, 8192};
  for (const int64_t n : sizes) {
    const auto bf16 = at::TensorOptions().device(cuda).dtype(at::kBFloat16);
    const at::Tensor a = at::randn({n, n}, bf16), b = at::randn({n, n}, bf16);
    at::Tensor c = at::empty({n, n}, bf16);
    const std::string bf16_rate = attempt(n, [&] { at::mm_out(c, a, b); });
    // E4M3 operands: A row-major [M, K], B column-major [K, N] (cuBLAS's FP8 layout).
    const at::Tensor a8 = a.to(at::kFloat8_e4m3fn), b8 = b.to(at::kFloat8_e4m3fn).t().contiguous().t();
    const at::Tensor one = at::ones({}, at::TensorOptions().device(cuda).dtype(at::kFloat));
    const std::string tensorwise = attempt(n, [&] { at::_scaled_mm(a8, b8, one, one, std::nullopt, std::nullopt, at::kBFloat16); });
    // Block scales: A 1 x 128 along K (outer-dim-major), B 128 x 128.
    const int64_t blocks = n / 128;
    const at::Tensor scale_a = at::ones({n, blocks}, one.options()).t().contiguous().t();
    const at::Tensor scale_b = at::ones({blocks, (blocks + 3) / 4 * 4}, one.options()).t();
    const std::string blockwise = attempt(n, [&] { at::_scaled_mm(a8, b8, scale_a, scale_b, std::nullopt, std::nullopt, at::kBFloat16); });
    std::printf("gemm %lld^3 TFLOP/s: bf16 %s | fp8 tensorwise %s | fp8 1x128/128x128 blocks %s\n", static_cast<long long>(n),
                bf16_rate.c_str(), tensorwise.c_str(), blockwise.c_str());
  }
  return 0;
}
