#include "fp8/fp8_gemm.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "fp8/block_quant.h"

namespace fmoe::fp8 {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

BlockQuantOptions tiles(int64_t rows, int64_t cols) {
  BlockQuantOptions o;
  o.block_rows = rows;
  o.block_cols = cols;
  return o;
}

class Fp8Linear : public torch::autograd::Function<Fp8Linear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w) {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});
    const at::Tensor wq = quantize_blockwise(w);
    ctx->save_for_backward({x2, wq});
    ctx->saved_data["dtype"] = static_cast<int64_t>(x.scalar_type());
    std::vector<int64_t> out_shape = x.sizes().vec();
    out_shape.back() = w.size(0);
    return at::mm(quantize_rowwise(x2), wq.t()).to(x.scalar_type()).view(out_shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x2 = saved[0];
    const at::Tensor& wq = saved[1];
    const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    const at::Tensor dy = grad_outputs[0].reshape({-1, wq.size(0)});
    // dgrad: dy [M, N] x W [N, K], reduced over N: dy tiled along N, W in blocks.
    const at::Tensor dx = at::mm(quantize_rowwise(dy), wq).to(dtype);
    // wgrad: dy^T [N, M] x x [M, K], reduced over the tokens M: both tiled along M.
    const at::Tensor dw = at::mm(quantize_colwise(dy).t(), quantize_colwise(x2));
    std::vector<int64_t> x_shape = grad_outputs[0].sizes().vec();
    x_shape.back() = wq.size(1);
    return {dx.view(x_shape), dw};
  }
};

}  // namespace

at::Tensor quantize_rowwise(const at::Tensor& x) { return fake_quantize(x, tiles(1, kTile)); }
at::Tensor quantize_colwise(const at::Tensor& x) { return fake_quantize(x, tiles(kTile, 1)); }
at::Tensor quantize_blockwise(const at::Tensor& w) { return fake_quantize(w, tiles(kTile, kTile)); }

at::Tensor fp8_linear(const at::Tensor& x, const at::Tensor& w) { return Fp8Linear::apply(x, w); }

std::string fp8_gemm_backend(const at::Device& device) {
  if (device.is_cpu()) return "emulated (FP32 GEMM on dequantized E4M3 operands; exact on CPU)";
  return "emulated on " + device.str() + " (a native block-scaled FP8 GEMM is not wired in yet)";
}

}  // namespace fmoe::fp8
