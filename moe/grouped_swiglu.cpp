#include "moe/grouped_swiglu.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <stdexcept>

#include "fp8/fp8_gemm.h"

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

// Zeroes the [G, ...] slices of groups with no rows (the GEMMs write all the others).
void zero_empty_groups(at::Tensor& per_group, const std::vector<int64_t>& rows_per_group) {
  for (size_t g = 0; g < rows_per_group.size(); ++g) {
    if (rows_per_group[g] == 0) per_group[static_cast<int64_t>(g)].zero_();
  }
}

// The operands as one GEMM sees them: unchanged, or E4M3 fake-quantized in FP32.
struct Operands {
  bool fp8;
  at::Tensor rows(const at::Tensor& t) const { return fp8 ? fp8::quantize_rowwise(t) : t; }
  at::Tensor cols(const at::Tensor& t) const { return fp8 ? fp8::quantize_colwise(t) : t; }
  at::Tensor weights(const at::Tensor& w) const { return fp8 ? fp8::quantize_blockwise(w) : w; }
};

class GroupedSwiGLU : public torch::autograd::Function<GroupedSwiGLU> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                            const std::vector<int64_t>& rows_per_group, bool fp8) {
    const Operands op{fp8};
    const int64_t ffn = w2.size(1);
    // FP8 GEMMs accumulate into FP32 buffers; otherwise buffers are in x's dtype.
    const at::TensorOptions buffer = x.options().dtype(fp8 ? at::kFloat : x.scalar_type());
    const at::Tensor xq = op.rows(x), w13q = op.weights(w13), w2q = op.weights(w2);
    at::Tensor h = at::empty({x.size(0), 2 * ffn}, buffer);
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      mm_into(h.narrow(0, offset, rows), xq.narrow(0, offset, rows), w13q[g]);
    });
    const at::Tensor aq = op.rows(at::silu(h.narrow(1, 0, ffn)) * h.narrow(1, ffn, ffn));
    at::Tensor y = at::empty({x.size(0), w2.size(2)}, buffer);
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      mm_into(y.narrow(0, offset, rows), aq.narrow(0, offset, rows), w2q[g]);
    });
    ctx->save_for_backward({x, w13q, w2q, h});
    ctx->saved_data["rows"] = c10::IValue(rows_per_group);
    ctx->saved_data["fp8"] = fp8;
    return y.to(x.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& x = saved[0];
    const at::Tensor& w13q = saved[1];
    const at::Tensor& w2q = saved[2];
    const at::Tensor& h = saved[3];
    const std::vector<int64_t> rows_per_group = ctx->saved_data["rows"].toIntVector();
    const Operands op{ctx->saved_data["fp8"].toBool()};
    const at::Tensor dy = grad_outputs[0].to(h.scalar_type()).contiguous();
    const int64_t ffn = w2q.size(1);

    const at::Tensor gate = h.narrow(1, 0, ffn);
    const at::Tensor up = h.narrow(1, ffn, ffn);
    const at::Tensor silu = at::silu(gate);
    const at::Tensor a = silu * up;

    const at::Tensor dy_rows = op.rows(dy);
    at::Tensor da = at::empty({x.size(0), ffn}, h.options());
    // Every expert's weight gradient is written whole by its GEMM; only those of experts without rows stay zero.
    at::Tensor dw2 = at::empty(w2q.sizes(), h.options());
    zero_empty_groups(dw2, rows_per_group);
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      mm_into(da.narrow(0, offset, rows), dy_rows.narrow(0, offset, rows), w2q[g].t());
      mm_into(dw2[g], op.cols(a.narrow(0, offset, rows)).t(), op.cols(dy.narrow(0, offset, rows)));
    });
    // d gate = silu'(gate) * (da * up), d up = da * silu(gate), written into one buffer.
    at::Tensor dh = at::empty({x.size(0), 2 * ffn}, h.options());
    at::Tensor dgate = dh.narrow(1, 0, ffn);
    at::Tensor dup = dh.narrow(1, ffn, ffn);
    at::silu_backward_out(dgate, da * up, gate);
    at::mul_out(dup, da, silu);

    const at::Tensor dh_rows = op.rows(dh);
    const at::Tensor xh = x.to(h.scalar_type());
    at::Tensor dx = at::empty({x.size(0), x.size(1)}, h.options());
    at::Tensor dw13 = at::empty(w13q.sizes(), h.options());
    zero_empty_groups(dw13, rows_per_group);
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      mm_into(dx.narrow(0, offset, rows), dh_rows.narrow(0, offset, rows), w13q[g].t());
      mm_into(dw13[g], op.cols(xh.narrow(0, offset, rows)).t(), op.cols(dh.narrow(0, offset, rows)));
    });
    return {dx.to(x.scalar_type()), dw13, dw2, at::Tensor(), at::Tensor()};
  }
};

void check_shapes(const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2, const std::vector<int64_t>& rows,
                  bool fp8 = false) {
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  if (x.dim() != 2 || w13.dim() != 3 || w2.dim() != 3 || w13.size(0) != static_cast<int64_t>(rows.size()) ||
      w2.size(0) != w13.size(0) || w13.size(1) != x.size(1) || w13.size(2) != 2 * w2.size(1) ||
      total != x.size(0) || w13.scalar_type() != w2.scalar_type() || (!fp8 && x.scalar_type() != w13.scalar_type())) {
    throw std::invalid_argument("grouped_swiglu: inconsistent shapes or dtypes");
  }
}

}  // namespace

at::Tensor grouped_swiglu(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                          const std::vector<int64_t>& rows_per_group, bool fp8) {
  check_shapes(x_SD, w13_GD2F, w2_GFD, rows_per_group, fp8);
  return GroupedSwiGLU::apply(x_SD.contiguous(), w13_GD2F.contiguous(), w2_GFD.contiguous(), rows_per_group, fp8);
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
