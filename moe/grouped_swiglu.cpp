#include "moe/grouped_swiglu.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>

namespace fmoe::moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// mm into a view of a preallocated buffer (mm_out takes its output by lvalue).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// Applies fn(group, row_offset, rows) to every non-empty group.
template <class Fn>
void for_each_group(const std::vector<int64_t>& rows_per_group, Fn&& fn) {
  int64_t offset = 0;
  for (size_t g = 0; g < rows_per_group.size(); ++g) {
    const int64_t rows = rows_per_group[g];
    if (rows > 0) fn(static_cast<int64_t>(g), offset, rows);
    offset += rows;
  }
}

class GroupedSwiGLU : public torch::autograd::Function<GroupedSwiGLU> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                            const std::vector<int64_t>& rows_per_group) {
    const int64_t ffn = w2.size(1);
    at::Tensor h = at::empty({x.size(0), 2 * ffn}, x.options());
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      mm_into(h.narrow(0, offset, rows), x.narrow(0, offset, rows), w13[g]);
    });
    const at::Tensor a = at::silu(h.narrow(1, 0, ffn)) * h.narrow(1, ffn, ffn);
    at::Tensor y = at::empty({x.size(0), w2.size(2)}, x.options());
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      mm_into(y.narrow(0, offset, rows), a.narrow(0, offset, rows), w2[g]);
    });
    ctx->save_for_backward({x, w13, w2, h});
    ctx->saved_data["rows"] = c10::IValue(rows_per_group);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w13 = saved[1];
    const at::Tensor& w2 = saved[2];
    const at::Tensor& h = saved[3];
    const std::vector<int64_t> rows_per_group = ctx->saved_data["rows"].toIntVector();
    const at::Tensor dy = grad_outputs[0].contiguous();
    const int64_t ffn = w2.size(1);

    const at::Tensor gate = h.narrow(1, 0, ffn);
    const at::Tensor up = h.narrow(1, ffn, ffn);
    const at::Tensor silu = at::silu(gate);
    const at::Tensor a = silu * up;

    at::Tensor da = at::empty({x.size(0), ffn}, x.options());
    at::Tensor dw2 = at::zeros_like(w2);
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      const at::Tensor dy_g = dy.narrow(0, offset, rows);
      mm_into(da.narrow(0, offset, rows), dy_g, w2[g].t());
      mm_into(dw2[g], a.narrow(0, offset, rows).t(), dy_g);
    });
    // d gate = silu'(gate) * (da * up), d up = da * silu(gate), written into one buffer.
    at::Tensor dh = at::empty({x.size(0), 2 * ffn}, x.options());
    at::Tensor dgate = dh.narrow(1, 0, ffn);
    at::Tensor dup = dh.narrow(1, ffn, ffn);
    at::silu_backward_out(dgate, da * up, gate);
    at::mul_out(dup, da, silu);

    at::Tensor dx = at::empty_like(x);
    at::Tensor dw13 = at::zeros_like(w13);
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      const at::Tensor dh_g = dh.narrow(0, offset, rows);
      mm_into(dx.narrow(0, offset, rows), dh_g, w13[g].t());
      mm_into(dw13[g], x.narrow(0, offset, rows).t(), dh_g);
    });
    return {dx, dw13, dw2, at::Tensor()};
  }
};

void check_shapes(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const std::vector<int64_t>& rows) {
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  if (x.dim() != 2 || w13.dim() != 3 || w2.dim() != 3 || w13.size(0) != static_cast<int64_t>(rows.size()) ||
      w2.size(0) != w13.size(0) || w13.size(1) != x.size(1) || w13.size(2) != 2 * w2.size(1) ||
      total != x.size(0) || x.scalar_type() != w13.scalar_type() || x.scalar_type() != w2.scalar_type()) {
    throw std::invalid_argument("grouped_swiglu: inconsistent shapes or dtypes");
  }
}

}  // namespace

at::Tensor grouped_swiglu(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                          const std::vector<int64_t>& rows_per_group) {
  check_shapes(x_SD, w13_GD2F, w2_GFD, rows_per_group);
  return GroupedSwiGLU::apply(x_SD.contiguous(), w13_GD2F.contiguous(), w2_GFD.contiguous(), rows_per_group);
}

at::Tensor grouped_swiglu_reference(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                                    const std::vector<int64_t>& rows_per_group) {
  check_shapes(x_SD, w13_GD2F, w2_GFD, rows_per_group);
  const int64_t ffn = w2_GFD.size(1);
  std::vector<at::Tensor> rows;
  int64_t row = 0;
  for (size_t g = 0; g < rows_per_group.size(); ++g) {
    for (int64_t i = 0; i < rows_per_group[g]; ++i, ++row) {
      const at::Tensor h = at::matmul(x_SD[row], w13_GD2F[static_cast<int64_t>(g)]);
      const at::Tensor a = at::silu(h.narrow(0, 0, ffn)) * h.narrow(0, ffn, ffn);
      rows.push_back(at::matmul(a, w2_GFD[static_cast<int64_t>(g)]));
    }
  }
  if (rows.empty()) return at::zeros({0, w2_GFD.size(2)}, x_SD.options());
  return at::stack(rows);
}

}  // namespace fmoe::moe
