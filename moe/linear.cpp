#include "moe/linear.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>

#include "fp8/fp8_gemm.h"
#include "moe/weight_grad.h"

namespace fmoe::moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class Linear : public torch::autograd::Function<Linear> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w, bool fp8) {
    const at::Tensor x2 = x.reshape({-1, x.size(-1)});
    ctx->save_for_backward({x2, w});
    ctx->saved_data["fp8"] = fp8;
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = w.size(0);
    const at::Tensor y = fp8 ? fp8::fp8_mm(x2, w, /*b_blocks=*/true).to(x.scalar_type()) : at::mm(x2, w.t());
    return y.view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor x2 = saved[0], w = saved[1];
    const bool fp8 = ctx->saved_data["fp8"].toBool();
    const at::Tensor dy = grad_outputs[0].reshape({-1, w.size(0)});
    // dgrad: dy [M, N] x W [N, K]; in FP8, dy tiled along N and W (as W^T [K, N]) in blocks.
    const at::Tensor dx = fp8 ? fp8::fp8_mm(dy, w.t(), /*b_blocks=*/true).to(x2.scalar_type()) : at::mm(dy, w);
    // wgrad: dy^T [N, M] x x [M, K], reduced over the tokens M (in FP8 both tiled along M).
    const auto weight_grad = [dy, x2, fp8] { return fp8 ? fp8::fp8_mm(dy.t(), x2.t(), /*b_blocks=*/false) : at::mm(dy.t(), x2); };
    std::vector<int64_t> x_shape = grad_outputs[0].sizes().vec();
    x_shape.back() = w.size(1);
    if (WeightGradQueue* queue = weight_grad_queue()) {
      queue->push({w}, [weight_grad] { return std::vector<at::Tensor>{weight_grad()}; });
      return {dx.view(x_shape), at::Tensor(), at::Tensor()};
    }
    return {dx.view(x_shape), weight_grad(), at::Tensor()};
  }
};

}  // namespace

at::Tensor deferrable_linear(const at::Tensor& x, const at::Tensor& weight, bool fp8) {
  if (weight.dim() != 2 || x.size(-1) != weight.size(1) || (!fp8 && x.scalar_type() != weight.scalar_type())) {
    throw std::invalid_argument("deferrable_linear: inconsistent shapes or dtypes");
  }
  return Linear::apply(x, weight, fp8);
}

}  // namespace fmoe::moe
