#include "trainer/precision.h"

#include "common/timing.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>

#include "parallel/communicator.h"
#include "parallel/device.h"

namespace fmoe::trainer {

using config::Config;
namespace {

using common::Clock;
using common::seconds_since;

// Best GFLOP/s of a @ b repeated until max_seconds have passed (at least once after a warm-up product).
// (A GPU runs the products asynchronously: each is timed up to its completion.)
double time_products(const at::Tensor& a, const at::Tensor& b, double max_seconds) {
  at::Tensor c = at::mm(a, b);  // warm-up: kernel selection, caches
  parallel::synchronize(a.device());
  const double flops = 2.0 * static_cast<double>(a.size(0) * a.size(1) * b.size(1));
  double best = 0;
  const auto start = Clock::now();
  do {
    const auto t0 = Clock::now();
    at::mm_out(c, a, b);
    parallel::synchronize(a.device());
    best = std::max(best, flops / std::max(seconds_since(t0), 1e-9) / 1e9);
  } while (seconds_since(start) < max_seconds);
  return best;
}

std::string format_rate(double gflops) {
  char text[32];
  std::snprintf(text, sizeof(text), gflops < 10 ? "%.1f" : "%.0f", gflops);
  return text;
}

}  // namespace

GemmShape run_gemm_shape(const Config& config) {
  return {config.training.micro_batch_size * config.training.seq_len, config.model.hidden_size,
          2 * config.model.moe_ffn_hidden_size};
}

GemmRates average_over_ranks(const GemmRates& rates, parallel::Communicator& world) {
  if (world.size() == 1) return rates;
  at::Tensor both = at::tensor({rates.bf16_gflops, rates.fp32_gflops}, at::kDouble);
  world.all_reduce(both, {parallel::ReduceOp::kSum})->wait();
  return {both[0].item<double>() / world.size(), both[1].item<double>() / world.size(), rates.injected};
}

GemmRates measure_gemm_rates(GemmShape shape, double max_seconds, c10::Device device) {
  // A small probe first: where a dtype runs at ~1 GFLOP/s the full shape would take seconds.
  const int64_t k = std::max<int64_t>(1, shape.k), n = std::max<int64_t>(1, shape.n);
  GemmRates rates;
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor probe_a = at::randn({64, k}).to(device, dtype), b = at::randn({k, n}).to(device, dtype);
    at::mm(probe_a, b);  // a GPU's first product of a dtype loads its kernels
    parallel::synchronize(device);
    const auto t0 = Clock::now();
    at::mm(probe_a, b);
    parallel::synchronize(device);
    const double probe_seconds = std::max(seconds_since(t0), 1e-6);
    // Rows such that one product takes about a quarter of the time allowed.
    const int64_t fit = static_cast<int64_t>(64.0 * (max_seconds / 4) / probe_seconds);
    const int64_t m = std::clamp<int64_t>(std::min(fit, shape.m), 64, std::max<int64_t>(64, shape.m));
    const double rate = time_products(at::randn({m, k}).to(device, dtype), b, max_seconds / 2);
    (dtype == at::kFloat ? rates.fp32_gflops : rates.bf16_gflops) = rate;
  }
  return rates;
}

std::optional<GemmRates> injected_gemm_rates(const std::string& text) {
  if (text.empty()) return std::nullopt;
  GemmRates rates;
  double bf16 = -1, fp32 = -1;
  if (std::sscanf(text.c_str(), "bf16=%lf,fp32=%lf", &bf16, &fp32) != 2 || !(bf16 > 0) || !(fp32 > 0)) {
    throw std::runtime_error("FMOE_GEMM_GFLOPS: expected 'bf16=RATE,fp32=RATE' in GFLOP/s, got '" + text + "'");
  }
  rates.bf16_gflops = bf16;
  rates.fp32_gflops = fp32;
  rates.injected = true;
  return rates;
}

PrecisionChoice choose_precision(const std::string& requested, const GemmRates& rates) {
  const std::string figures = "bf16 GEMM " + format_rate(rates.bf16_gflops) + " GFLOP/s, fp32 " + format_rate(rates.fp32_gflops) +
                              " GFLOP/s" + (rates.injected ? ", injected by FMOE_GEMM_GFLOPS, not measured" : "");
  const bool bf16_faster = rates.bf16_gflops > rates.fp32_gflops;
  PrecisionChoice choice;
  choice.name = requested == "auto" ? (bf16_faster ? "bf16" : "fp32") : requested;
  choice.dtype = choice.name == "bf16" ? at::kBFloat16 : at::kFloat;
  if (requested == "auto") {
    choice.message = "precision auto -> " + choice.name + " (" + figures + ")";
  } else if (requested == "bf16" && !bf16_faster) {
    choice.warning = true;
    choice.message = "warning: training.precision bf16 is slower than fp32 on this machine (" + figures +
                     "); set training.precision: auto or fp32 to train faster";
  } else {
    choice.message = "precision " + choice.name + " (" + figures + ")";
  }
  return choice;
}

double measure_peak_gflops(at::ScalarType dtype, double max_seconds, c10::Device device) {
  const auto start = Clock::now();
  int64_t size = 256;
  const int64_t largest = device.is_cuda() ? 8192 : 2048;
  double best = 0;
  for (;;) {
    // Drawn where they are used (the CPU draws FP32 and rounds, as it always has).
    const auto random = [&] {
      return device.is_cuda() ? at::randn({size, size}, at::TensorOptions().device(device).dtype(dtype))
                              : at::randn({size, size}).to(dtype);
    };
    const at::Tensor a = random(), b = random();
    at::mm(a, b);  // kernel selection
    parallel::synchronize(device);
    const double left = max_seconds - seconds_since(start);
    const auto t0 = Clock::now();
    at::Tensor c = at::mm(a, b);
    parallel::synchronize(device);
    const double one = std::max(seconds_since(t0), 1e-9);
    // Twice the size is 8x the work: grow while that still fits twice in the time left.
    const bool grow = size < largest && 16 * one < left - one;
    if (!grow) {
      best = std::max(best, time_products(a, b, std::max(0.0, max_seconds - seconds_since(start))));
      break;
    }
    best = std::max(best, 2.0 * static_cast<double>(size * size * size) / one / 1e9);
    size *= 2;
  }
  return best;
}

}  // namespace fmoe::trainer
