#include "fp8/block_quant.h"

#include <ATen/ATen.h>

#include "common/test_hooks.h"
#include "fp8/fake_quant_cpu.h"

#include <stdexcept>

namespace fmoe::fp8 {
namespace {

at::ScalarType torch_dtype(Format format) {
  return format == Format::kE4M3 ? at::kFloat8_e4m3fn : at::kFloat8_e5m2;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// x viewed as [batch, rows, cols] with rows and cols zero-padded to whole blocks.
struct Blocked {
  at::Tensor padded;  // fp32 [B, Rp, Cp]
  int64_t rows, cols;
};

Blocked to_blocks(const at::Tensor& x, const BlockQuantOptions& o) {
  if (o.block_rows < 1 || o.block_cols < 1) throw std::invalid_argument("fp8: block sizes must be >= 1");
  const at::Tensor x3 = x.dim() == 1 ? x.view({1, 1, -1}) : x.reshape({-1, x.size(-2), x.size(-1)});
  const int64_t rows = x3.size(1), cols = x3.size(2);
  const int64_t pad_rows = ceil_div(rows, o.block_rows) * o.block_rows - rows;
  const int64_t pad_cols = ceil_div(cols, o.block_cols) * o.block_cols - cols;
  at::Tensor padded = x3.to(at::kFloat);
  if (pad_rows || pad_cols) padded = at::constant_pad_nd(padded, {0, pad_cols, 0, pad_rows}, 0.0);
  return {padded, rows, cols};
}

// [B, Rp, Cp] -> [B, Rp/br, br, Cp/bc, bc]
at::Tensor block_view(const at::Tensor& padded, const BlockQuantOptions& o) {
  return padded.view({padded.size(0), padded.size(1) / o.block_rows, o.block_rows, padded.size(2) / o.block_cols, o.block_cols});
}

at::Tensor scales_for(const at::Tensor& blocks, const BlockQuantOptions& o) {
  const float max_finite = format_info(o.format).max_finite;
  const at::Tensor amax = blocks.abs().amax({2, 4});
  at::Tensor scale = at::where(amax > 0, amax / max_finite, at::ones_like(amax));
  if (o.power_of_two_scales) scale = at::exp2(at::ceil(at::log2(scale)));
  return scale;
}

at::Tensor crop(const at::Tensor& padded, const Blocked& b, const at::Tensor& like) {
  return padded.narrow(1, 0, b.rows).narrow(2, 0, b.cols).reshape(like.sizes());
}

}  // namespace

at::Tensor encode_tensor(const at::Tensor& x, Format format, Overflow overflow) {
  at::Tensor f = x.to(at::kFloat);
  if (overflow == Overflow::kSaturate) {
    const double max_finite = format_info(format).max_finite;
    f = at::clamp(f, -max_finite, max_finite);  // NaN stays NaN
  }
  return f.to(torch_dtype(format)).view(at::kByte);
}

at::Tensor decode_tensor(const at::Tensor& codes, Format format) {
  return codes.view(torch_dtype(format)).to(at::kFloat);
}

BlockQuantized quantize_blocks(const at::Tensor& x, const BlockQuantOptions& o) {
  const Blocked b = to_blocks(x, o);
  const at::Tensor blocks = block_view(b.padded, o);
  const at::Tensor scale = scales_for(blocks, o);
  const at::Tensor scaled = (blocks / scale.unsqueeze(2).unsqueeze(4)).view(b.padded.sizes());
  BlockQuantized q;
  q.codes = crop(encode_tensor(scaled, o.format, Overflow::kSaturate), b, x).contiguous();
  std::vector<int64_t> scale_shape = x.dim() == 1 ? std::vector<int64_t>{scale.size(1), scale.size(2)} : x.sizes().vec();
  if (x.dim() >= 2) {
    scale_shape[scale_shape.size() - 2] = scale.size(1);
    scale_shape[scale_shape.size() - 1] = scale.size(2);
  }
  q.scales = scale.reshape(scale_shape).contiguous();
  q.options = o;
  return q;
}

at::Tensor dequantize_blocks(const BlockQuantized& q) {
  const Blocked b = to_blocks(decode_tensor(q.codes, q.options.format), q.options);
  const at::Tensor scale = q.scales.reshape({b.padded.size(0), -1, q.scales.size(-1)});
  const at::Tensor values = (block_view(b.padded, q.options) * scale.unsqueeze(2).unsqueeze(4)).view(b.padded.sizes());
  return crop(values, b, q.codes);
}

at::Tensor fake_quantize(const at::Tensor& x, const BlockQuantOptions& o) {
  // CPU tensors: one fused kernel, bit for bit the composition below.
  if (x.is_cpu() && x.dim() >= 1 && o.format == Format::kE4M3 && !o.power_of_two_scales && o.block_rows >= 1 && o.block_cols >= 1 &&
      (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) && common::test_hooks().fused_cpu_kernels) {
    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor y = at::empty(x.sizes(), xf.options());
    const int64_t rows = x.dim() == 1 ? 1 : x.size(-2), cols = x.size(-1);
    const int64_t batch = rows * cols == 0 ? 0 : x.numel() / (rows * cols);
    if (batch > 0) fake_quant_kernel().e4m3(xf.data_ptr<float>(), y.data_ptr<float>(), batch, rows, cols, o.block_rows, o.block_cols);
    return y;
  }
  const Blocked b = to_blocks(x, o);
  const at::Tensor blocks = block_view(b.padded, o);
  const at::Tensor scale = scales_for(blocks, o).unsqueeze(2).unsqueeze(4);
  const at::Tensor scaled = (blocks / scale).view(b.padded.sizes());
  const at::Tensor roundtrip = decode_tensor(encode_tensor(scaled, o.format, Overflow::kSaturate), o.format);
  return crop((block_view(roundtrip, o) * scale).view(b.padded.sizes()), b, x);
}

}  // namespace fmoe::fp8
