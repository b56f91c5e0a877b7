#include "moe/rms_norm.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "moe/cpu_kernels.h"

namespace fmoe::moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool is_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16; }

// Whether the fused CPU kernels take these operands (contiguous FP32 rows and
// weight, an FP32 or BF16 output).
bool fused_norm(const at::Tensor& x, const at::Tensor& weight, at::ScalarType out_dtype) {
  return x.is_cpu() && fused_cpu_kernels_enabled() && x.scalar_type() == at::kFloat && x.is_contiguous() && weight.scalar_type() == at::kFloat &&
         weight.is_contiguous() && weight.dim() == 1 && (out_dtype == at::kFloat || out_dtype == at::kBFloat16);
}

// y and r = rsqrt(mean(s^2) + eps) ([..., 1]) of s; with delta, s = x + delta is
// written into sum first (the fused path) or computed (ATen).
struct NormForward {
  at::Tensor s, y, r;
};
NormForward norm_forward(const at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps, at::ScalarType out_dtype) {
  if (fused_norm(x, weight, out_dtype) && (!delta || (delta->is_contiguous() && (delta->scalar_type() == at::kFloat || is_bf16(*delta))))) {
    const int64_t dim = x.size(-1);
    std::vector<int64_t> r_shape = x.sizes().vec();
    r_shape.back() = 1;
    NormForward out;
    out.s = delta ? at::empty_like(x) : x;
    out.y = at::empty(x.sizes(), x.options().dtype(out_dtype));
    out.r = at::empty(r_shape, x.options());
    cpu_kernels().rms_norm_forward(x.data_ptr<float>(), delta ? delta->data_ptr() : nullptr, delta && is_bf16(*delta),
                                   weight.data_ptr<float>(), static_cast<float>(eps), delta ? out.s.data_ptr<float>() : nullptr,
                                   out.y.data_ptr(), out_dtype == at::kBFloat16, out.r.data_ptr<float>(), x.numel() / dim, dim);
    return out;
  }
  NormForward out;
  out.s = delta ? x + delta->to(at::kFloat) : x;
  out.r = (out.s.square().mean(-1, /*keepdim=*/true) + eps).rsqrt();
  at::Tensor y = out.s * out.r;
  y.mul_(weight);
  out.y = y.to(out_dtype);
  return out;
}

// {dx (+ g_sum), dw} of the norm at s.
std::pair<at::Tensor, at::Tensor> norm_backward(const at::Tensor& s, const at::Tensor& weight, const at::Tensor& r, const at::Tensor& g_in,
                                                const at::Tensor& g_sum) {
  const int64_t dim = s.size(-1);
  const at::Tensor g = g_in.contiguous();
  if (fused_norm(s, weight, at::kFloat) && (g.scalar_type() == at::kFloat || is_bf16(g)) &&
      (!g_sum.defined() || (g_sum.scalar_type() == at::kFloat && g_sum.is_contiguous()))) {
    at::Tensor dx = at::empty_like(s), dw = at::empty({dim}, weight.options());
    cpu_kernels().rms_norm_backward(s.data_ptr<float>(), weight.data_ptr<float>(), r.data_ptr<float>(), g.data_ptr(), is_bf16(g),
                                    g_sum.defined() ? g_sum.data_ptr<float>() : nullptr, dx.data_ptr<float>(), dw.data_ptr<float>(),
                                    s.numel() / dim, dim);
    return {dx, dw};
  }
  const at::Tensor gf = g.to(s.scalar_type());
  const at::Tensor gw = gf * weight;
  const at::Tensor coef = r.pow(3) * (gw * s).sum(-1, /*keepdim=*/true) / static_cast<double>(dim);
  at::Tensor dx = gw * r;
  dx.addcmul_(s, coef, -1.0);
  if (g_sum.defined()) dx.add_(g_sum);
  const at::Tensor dw = (gf * s * r).reshape({-1, dim}).sum(0);
  return {dx, dw};
}

class RmsNorm : public torch::autograd::Function<RmsNorm> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight, double eps, int64_t out_dtype) {
    NormForward f = norm_forward(x, nullptr, weight, eps, static_cast<at::ScalarType>(out_dtype));
    ctx->save_for_backward({x, weight, f.r});
    return f.y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw] = norm_backward(saved[0], saved[1], saved[2], grads[0], at::Tensor());
    return {dx, dw, at::Tensor(), at::Tensor()};
  }
};

class AddRmsNorm : public torch::autograd::Function<AddRmsNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps,
                               int64_t out_dtype) {
    NormForward f = norm_forward(x, &delta, weight, eps, static_cast<at::ScalarType>(out_dtype));
    ctx->save_for_backward({f.s, weight, f.r});
    ctx->saved_data["delta_dtype"] = static_cast<int64_t>(delta.scalar_type());
    return {f.s, f.y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor g_sum = grads[0].defined() ? grads[0].to(at::kFloat).contiguous() : at::Tensor();
    auto [dx, dw] = norm_backward(saved[0], saved[1], saved[2], grads[1], g_sum);
    const at::Tensor ddelta = dx.to(static_cast<at::ScalarType>(ctx->saved_data["delta_dtype"].toInt()));
    return {dx, ddelta, dw, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype) {
  // A CPU view (a narrowed projection) is copied once so that the fused kernel takes it.
  return RmsNorm::apply(x.is_cpu() ? x.contiguous() : x, weight, eps, static_cast<int64_t>(out_dtype));
}

std::pair<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps,
                                               at::ScalarType out_dtype) {
  TORCH_CHECK(x.sizes() == delta.sizes(), "add_rms_norm: x ", x.sizes(), " and delta ", delta.sizes(), " differ in shape");
  const variable_list out = x.is_cpu() ? AddRmsNorm::apply(x.contiguous(), delta.contiguous(), weight, eps, static_cast<int64_t>(out_dtype))
                                       : AddRmsNorm::apply(x, delta, weight, eps, static_cast<int64_t>(out_dtype));
  return {out[0], out[1]};
}

at::Tensor rms_norm_reference(const at::Tensor& x, const at::Tensor& weight, double eps, at::ScalarType out_dtype) {
  const at::Tensor scale = (x.square().mean(-1, true) + eps).rsqrt();
  return (x * scale * weight).to(out_dtype);
}

}  // namespace fmoe::moe
