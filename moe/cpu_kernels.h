// Fused CPU kernels for the step's element-wise work outside the GEMMs: SwiGLU,
// RMSNorm (with the residual add before it), the routing selection and the
// cross entropy of the head's logits (log-sum-exp and its gradient). Each is
// one pass over the rows, vectorised with ATen's at::vec and parallel over rows
// with at::parallel_for. moe/cpu_kernels_isa.cpp is compiled once per
// instruction set (DEFAULT, AVX2, AVX512), like ATen's own kernels, and
// cpu_kernels() picks the table for the CPU at run time (at::get_cpu_capability(),
// which ATEN_CPU_CAPABILITY overrides). Raw pointers, contiguous rows; the
// callers (grouped_swiglu.cpp, rms_norm.cpp, router.cpp, cross_entropy.cpp) check
// shapes and dtypes.
// Results do not depend on the number of threads: rows are independent, and
// the weight gradient of RMSNorm sums fixed blocks of rows in a fixed order.
#pragma once

#include <cstdint>

namespace fmoe::moe {

struct CpuKernels {
  const char* isa;
  // a[r, :] = silu(h[r, :F]) * h[r, F:], h [rows, 2F], a [rows, F]; both BF16 or both FP32.
  void (*swiglu_forward)(const void* h, void* a, int64_t rows, int64_t ffn, bool bf16);
  // dh = [da * up * silu'(gate) | da * silu(gate)] ([rows, 2F]); when a is not null it
  // also receives silu(gate) * up (what the w2 weight gradient reads).
  void (*swiglu_backward)(const void* h, const void* da, void* dh, void* a, int64_t rows, int64_t ffn, bool bf16);
  // s = x + delta (delta BF16 or FP32; when delta is null, s = x and sum is not written),
  // r = rsqrt(mean(s^2) + eps) per row, y = s * r * w in BF16 or FP32.
  void (*rms_norm_forward)(const float* x, const void* delta, bool delta_bf16, const float* w, float eps, float* sum, void* y,
                           bool y_bf16, float* r, int64_t rows, int64_t dim);
  // dx = r (g w) - s r^3 mean(g w s) (+ g_sum, the gradient reaching s directly, when not null);
  // dw = sum over rows of g s r. g BF16 or FP32.
  void (*rms_norm_backward)(const float* s, const float* w, const float* r, const void* g, bool g_bf16, const float* g_sum, float* dx,
                            float* dw, int64_t rows, int64_t dim);
  // Per token: selection = scores + bias; with group_top_k < groups only the experts of the
  // group_top_k best groups (a group's score: the sum of its two best, or its best when
  // top2_groups is false) stay; the top_k experts by selection, best first (ties: lower index).
  void (*route_select)(const float* scores, const float* bias, int64_t tokens, int64_t experts, int64_t groups, int64_t group_top_k,
                       int64_t top_k, bool top2_groups, int64_t* experts_out);
  // Per row of logits [rows, vocab] (BF16 or FP32): lse = log(sum(exp(logits))) and the
  // target's logit, in FP32.
  void (*cross_entropy_forward)(const void* logits, bool bf16, const int64_t* targets, int64_t rows, int64_t vocab, float* lse,
                                float* target_logit);
  // grad = (exp(logits - lse) - onehot(target)) * scale, in the logits' dtype.
  void (*cross_entropy_backward)(const void* logits, bool bf16, const int64_t* targets, const float* lse, float scale, void* grad,
                                 int64_t rows, int64_t vocab);
};

// The table for this CPU (chosen once).
const CpuKernels& cpu_kernels();

// Whether the callers use the fused kernels on CPU tensors: yes unless the test
// hook FMOE_FUSED_CPU_KERNELS=0 sends them to the unfused ATen compositions
// instead, for measuring one against the other (docs/test-hooks.md).
bool fused_cpu_kernels_enabled();

namespace cpu_isa {
const CpuKernels& kernels_DEFAULT();
const CpuKernels& kernels_AVX2();
const CpuKernels& kernels_AVX512();
}  // namespace cpu_isa

}  // namespace fmoe::moe
