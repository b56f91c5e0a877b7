#include "moe/rope.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

namespace fmoe::moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// out = rotate(x) by the angles (cos, sin) per position: on the halves (x1, x2),
// out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin. The inverse rotation is the same
// with -sin. out and x must not overlap; cos / sin: [T, 1, half] in x's dtype.
void rotate_into(const at::Tensor& out, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, double sign) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  at::Tensor o1 = out.narrow(-1, 0, half), o2 = out.narrow(-1, half, half);
  at::mul_out(o1, x1, cos);
  o1.addcmul_(x2, sin, -sign);
  at::mul_out(o2, x2, cos);
  o2.addcmul_(x1, sin, sign);
}

class SplitQkvRope : public torch::autograd::Function<SplitQkvRope> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& qkv, int64_t heads, int64_t kv_heads,
                               const at::Tensor& cos_TH, const at::Tensor& sin_TH) {
    const at::Tensor cos = cos_TH.to(qkv.scalar_type()).unsqueeze(1), sin = sin_TH.to(qkv.scalar_type()).unsqueeze(1);
    const at::Tensor q_in = qkv.narrow(2, 0, heads), k_in = qkv.narrow(2, heads, kv_heads);
    at::Tensor q = at::empty(q_in.sizes(), qkv.options()), k = at::empty(k_in.sizes(), qkv.options());
    rotate_into(q, q_in, cos, sin, 1.0);
    rotate_into(k, k_in, cos, sin, 1.0);
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["kv_heads"] = kv_heads;
    ctx->saved_data["shape"] = c10::IValue(qkv.sizes().vec());
    return {q, k, qkv.narrow(2, heads + kv_heads, kv_heads)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t heads = ctx->saved_data["heads"].toInt(), kv_heads = ctx->saved_data["kv_heads"].toInt();
    const std::vector<int64_t> shape = ctx->saved_data["shape"].toIntVector();
    const at::TensorOptions options = saved[0].options();
    at::Tensor dqkv = at::empty(shape, options);
    const auto part = [&](int64_t start, int64_t count) { return dqkv.narrow(2, start, count); };
    const auto fill = [&](const at::Tensor& dst, const at::Tensor& grad, bool rotated) {
      if (!grad.defined()) {
        dst.zero_();
      } else if (rotated) {
        rotate_into(dst, grad, saved[0], saved[1], -1.0);  // a rotation's transpose is its inverse
      } else {
        dst.copy_(grad);
      }
    };
    fill(part(0, heads), grads[0], true);
    fill(part(heads, kv_heads), grads[1], true);
    fill(part(heads + kv_heads, kv_heads), grads[2], false);
    return {dqkv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

RotatedQkv split_qkv_rope(const at::Tensor& qkv_BTCd, int64_t heads, int64_t kv_heads, const at::Tensor& cos_TH,
                          const at::Tensor& sin_TH) {
  const variable_list out = SplitQkvRope::apply(qkv_BTCd, heads, kv_heads, cos_TH, sin_TH);
  return {out[0], out[1], out[2]};
}

}  // namespace fmoe::moe
