// Which dtype the GEMMs run in, chosen by measurement. On CPUs with AMX or
// AVX512-BF16 LibTorch's BF16 GEMM is several times faster than FP32; on CPUs
// with AVX2 only it falls back to a generic loop that is ~90x slower. The
// machine a run lands on is not chosen, so `training.precision: auto` times a
// short GEMM at the run's shapes in both dtypes and takes the faster one.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

#include "config/config.h"

namespace fmoe::parallel {
class Communicator;
}

namespace fmoe::trainer {

using config::Config;

struct GemmRates {
  double bf16_gflops = 0;
  double fp32_gflops = 0;
  bool injected = false;  // given by FMOE_GEMM_GFLOPS, not measured: every line that shows them says so
};

struct GemmShape {
  int64_t m = 0, k = 0, n = 0;
};

// The GEMM a run's precision is chosen at: a micro-batch's tokens through an
// expert's gate/up projection ([tokens, hidden] x [hidden, 2 moe_ffn]).
GemmShape run_gemm_shape(const Config& config);

// Times [m, k] x [k, n] in BF16 and in FP32 on device (the CPU: its current intra-op threads),
// each for at most max_seconds (at least one product; m is cut so that one
// product of the slow kind cannot take much longer).
GemmRates measure_gemm_rates(GemmShape shape, double max_seconds = 0.4, c10::Device device = c10::kCPU);

// Rates given as "bf16=1.3,fp32=121" (the FMOE_GEMM_GFLOPS test hook: tests
// inject a machine's figures so that the choice does not depend on the machine
// that runs them), marked injected; nullopt for an empty text.
std::optional<GemmRates> injected_gemm_rates(const std::string& text);

// The mean of every rank's rates, so that all ranks make the same choice.
GemmRates average_over_ranks(const GemmRates& rates, parallel::Communicator& world);

struct PrecisionChoice {
  at::ScalarType dtype = at::kFloat;
  std::string name;     // "bf16" | "fp32"
  std::string message;  // "precision auto -> fp32 (bf16 GEMM 1.3 GFLOP/s, fp32 121 GFLOP/s)"
  bool warning = false; // an explicit bf16 on a machine where BF16 is slower
};

// requested: auto | bf16 | fp32. Pure: the same rates give the same choice.
PrecisionChoice choose_precision(const std::string& requested, const GemmRates& rates);

// GFLOP/s of square GEMMs in dtype, the peak MFU is reported against: the size
// grows from 256 while one product fits the time left, so the whole measurement
// stays under about max_seconds on any CPU (a 2048^3 BF16 product takes 13 s
// where BF16 falls back to the generic loop).
// On a GPU the size grows to 8192 (a GPU needs large products to reach its peak).
double measure_peak_gflops(at::ScalarType dtype, double max_seconds = 0.6, c10::Device device = c10::kCPU);

}  // namespace fmoe::trainer
