// SwiGLU experts computed grouped: rows [offset_e, offset_e + n_e) of x go
// through expert e. One autograd node for the whole group; per expert it runs
// three GEMMs forward and four backward, into preallocated buffers, and the
// element-wise SwiGLU over all rows at once. A dense FFN is the one-group case.
//
//   h = x_e W13_e    ([n, D] x [D, 2F]),  a = silu(h[:, :F]) * h[:, F:],  y_e = a W2_e  ([n, F] x [F, D])
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fmoe::moe {

// x_SD, w13_GD2F, w2_GFD share one dtype; rows_per_group sums to x.size(0).
// With fp8, every GEMM takes E4M3 operands (fp8/fp8_gemm.h): x, the activation
// and the output gradients in 1 x 128 tiles along the reduction dim (128 x 1 along
// the tokens of one group for the weight gradients), the FP32 master weights in
// 128 x 128 blocks; FP32 accumulation; x may then be BF16 and the weights FP32.
at::Tensor grouped_swiglu(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                          const std::vector<int64_t>& rows_per_group, bool fp8 = false);

// FP8 experts as one fp8::fp8_mm per GEMM and group (DeepSeek-V3's tiling): what
// grouped_swiglu(..., fp8=true) runs on a GPU, where each product is a native
// block-scaled at::_scaled_mm when its dims are multiples of 128; elsewhere the
// same products emulated (tests compare it with the CPU path).
at::Tensor grouped_swiglu_fp8_gemms(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                                    const std::vector<int64_t>& rows_per_group);

// The same product through LibTorch's grouped GEMM (at::_grouped_mm): group
// g holds rows [ends_G[g-1], ends_G[g]) of x (int32 cumulative ends on x's
// device), so the group sizes never reach the host. Five grouped calls per
// step (two forward, three backward pairs), whatever the number of experts.
at::Tensor grouped_swiglu_grouped_mm(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                                     const at::Tensor& ends_G);

// Whether the experts of a forward in dtype on device go through
// grouped_swiglu_grouped_mm: on CUDA in BF16 when a small probe agrees with
// the per-expert loop (checked once per device and dtype). forced "on" or "off"
// (the FMOE_GROUPED_MM test hook) overrides it (on also runs LibTorch's CPU
// version, for tests); empty decides as above.
bool use_grouped_mm(c10::Device device, at::ScalarType dtype, const std::string& forced = "");

// int32 cumulative ends of groups of these sizes, on device.
at::Tensor group_ends(const std::vector<int64_t>& rows_per_group, c10::Device device);

// One token at a time, with plain autograd ops: the slow reference for tests.
at::Tensor grouped_swiglu_reference(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                                    const std::vector<int64_t>& rows_per_group);

}  // namespace fmoe::moe
