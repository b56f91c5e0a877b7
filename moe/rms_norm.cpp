#include "moe/rms_norm.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace fmoe::moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

class RmsNorm : public torch::autograd::Function<RmsNorm> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps,
                            int64_t out_dtype) {
    const at::Tensor r = (x.square().mean(-1, /*keepdim=*/true) + eps).rsqrt();  // [..., 1]
    at::Tensor y = x * r;
    y.mul_(weight);
    ctx->save_for_backward({x, weight, r});
    return y.to(static_cast<at::ScalarType>(out_dtype));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& weight = saved[1];
    const at::Tensor& r = saved[2];
    const at::Tensor g = grads[0].to(x.scalar_type());
    const int64_t dim = x.size(-1);
    const at::Tensor gw = g * weight;
    const at::Tensor coef = r.pow(3) * (gw * x).sum(-1, /*keepdim=*/true) / static_cast<double>(dim);
    at::Tensor dx = gw * r;
    dx.addcmul_(x, coef, -1.0);
    const at::Tensor dw = (g * x * r).reshape({-1, dim}).sum(0);
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype) {
  return RmsNorm::apply(x, weight, eps, static_cast<int64_t>(out_dtype));
}

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype) {
  const at::Tensor scale = (x.square().mean(-1, true) + eps).rsqrt();
  return (x * scale * weight).to(out_dtype);
}

}  // namespace fmoe::moe
