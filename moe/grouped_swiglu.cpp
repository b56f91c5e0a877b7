#include "moe/grouped_swiglu.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "fp8/fp8_gemm.h"
#include "moe/cpu_kernels.h"
#include "moe/weight_grad.h"

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

// h = [gate | up] of a SwiGLU ([rows, 2F]) and the element-wise work on it. CPU
// tensors go through the fused kernels of moe/cpu_kernels.h (one pass over the
// rows, FP32 arithmetic, one rounding per output); other devices through ATen.
bool fused_swiglu(const at::Tensor& h) {
  return h.is_cpu() && fused_cpu_kernels_enabled() && h.is_contiguous() && (h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16);
}

// a = silu(gate) * up.
at::Tensor swiglu_output(const at::Tensor& h, int64_t ffn) {
  if (fused_swiglu(h)) {
    at::Tensor a = at::empty({h.size(0), ffn}, h.options());
    cpu_kernels().swiglu_forward(h.data_ptr(), a.data_ptr(), h.size(0), ffn, h.scalar_type() == at::kBFloat16);
    return a;
  }
  return at::silu(h.narrow(1, 0, ffn)) * h.narrow(1, ffn, ffn);
}

// [d gate | d up] = [silu'(gate) * (da * up) | da * silu(gate)] in one buffer, and
// a = silu(gate) * up again (what the w2 weight gradient reads), from the same pass.
struct SwiGLUGrads {
  at::Tensor dh, a;
};
SwiGLUGrads swiglu_backward(const at::Tensor& h, const at::Tensor& da_in) {
  const int64_t ffn = da_in.size(1);
  const at::Tensor da = da_in.contiguous();
  at::Tensor dh = at::empty({da.size(0), 2 * ffn}, da.options());
  if (fused_swiglu(h) && da.scalar_type() == h.scalar_type()) {
    at::Tensor a = at::empty({h.size(0), ffn}, h.options());
    cpu_kernels().swiglu_backward(h.data_ptr(), da.data_ptr(), dh.data_ptr(), a.data_ptr(), h.size(0), ffn,
                                  h.scalar_type() == at::kBFloat16);
    return {dh, a};
  }
  const at::Tensor gate = h.narrow(1, 0, ffn), up = h.narrow(1, ffn, ffn), silu = at::silu(gate);
  at::Tensor dgate = dh.narrow(1, 0, ffn), dup = dh.narrow(1, ffn, ffn);
  at::silu_backward_out(dgate, da * up, gate);
  at::mul_out(dup, da, silu);
  return {dh, silu * up};
}

// A node's gradients: the input's now; the weights' (w13, w2) now too, or, inside
// a DeferWeightGrads scope, queued (moe/weight_grad.h). `unused` undefined
// gradients follow for the node's non-tensor arguments.
variable_list with_weight_grads(const at::Tensor& dx, const at::Tensor& w13, const at::Tensor& w2, WeightGradQueue::Compute weight_grads,
                                size_t unused) {
  variable_list out{dx};
  if (WeightGradQueue* queue = weight_grad_queue()) {
    queue->push({w13, w2}, std::move(weight_grads));
    out.resize(3);
  } else {
    const std::vector<at::Tensor> g = weight_grads();
    out.push_back(g[0]);
    out.push_back(g[1]);
  }
  out.resize(3 + unused);
  return out;
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
    const at::Tensor aq = op.rows(swiglu_output(h, ffn));
    at::Tensor y = at::empty({x.size(0), w2.size(2)}, buffer);
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      mm_into(y.narrow(0, offset, rows), aq.narrow(0, offset, rows), w2q[g]);
    });
    ctx->save_for_backward({x, w13q, w2q, h, w13, w2});
    ctx->saved_data["rows"] = c10::IValue(rows_per_group);
    ctx->saved_data["fp8"] = fp8;
    return y.to(x.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w13q = saved[1], &w2q = saved[2], &h = saved[3], &w13 = saved[4], &w2 = saved[5];
    const std::vector<int64_t> rows_per_group = ctx->saved_data["rows"].toIntVector();
    const Operands op{ctx->saved_data["fp8"].toBool()};
    const at::Tensor dy = grad_outputs[0].to(h.scalar_type()).contiguous();
    const int64_t ffn = w2q.size(1);

    const at::Tensor dy_rows = op.rows(dy);
    at::Tensor da = at::empty({x.size(0), ffn}, h.options());
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      mm_into(da.narrow(0, offset, rows), dy_rows.narrow(0, offset, rows), w2q[g].t());
    });
    const SwiGLUGrads swiglu_grads = swiglu_backward(h, da);
    const at::Tensor &dh = swiglu_grads.dh, &a = swiglu_grads.a;
    const at::Tensor dh_rows = op.rows(dh);
    at::Tensor dx = at::empty({x.size(0), x.size(1)}, h.options());
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      mm_into(dx.narrow(0, offset, rows), dh_rows.narrow(0, offset, rows), w13q[g].t());
    });
    const auto weight_grads = [x, h, a, dy, dh, rows_per_group, op, w13_shape = w13q.sizes().vec(), w2_shape = w2q.sizes().vec()] {
      const at::Tensor xh = x.to(h.scalar_type());
      // Every expert's weight gradient is written whole by its GEMM; only those of experts without rows stay zero.
      at::Tensor dw2 = at::empty(w2_shape, h.options()), dw13 = at::empty(w13_shape, h.options());
      zero_empty_groups(dw2, rows_per_group);
      zero_empty_groups(dw13, rows_per_group);
      for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
        mm_into(dw2[g], op.cols(a.narrow(0, offset, rows)).t(), op.cols(dy.narrow(0, offset, rows)));
        mm_into(dw13[g], op.cols(xh.narrow(0, offset, rows)).t(), op.cols(dh.narrow(0, offset, rows)));
      });
      return std::vector<at::Tensor>{dw13, dw2};
    };
    return with_weight_grads(dx.to(x.scalar_type()), w13, w2, weight_grads, 2);
  }
};

// sum over each group's rows of a_g^T b_g: [S, P] x [S, Q] -> [G, P, Q], one
// grouped call with the groups along the reduction dim S. The first operand is
// passed column-major (a_SP transposed in place) and the second row-major: the
// layout of LibTorch's own weight gradient for grouped GEMMs, in which a group
// moves the operands' start by whole rows (always 16-byte aligned) and may be
// empty. The row-major / column-major layout instead needs every group to start
// at a 16-byte boundary of S and to be non-empty, which its CUDA kernel asserts
// (fatal to the process), so routed token counts cannot use it. Groups without
// rows are set to zero rather than trusted to be.
at::Tensor grouped_weight_grad(const at::Tensor& a_SP, const at::Tensor& b_SQ, const at::Tensor& ends_G) {
  at::Tensor grad = at::_grouped_mm(a_SP.contiguous().t(), b_SQ.contiguous(), ends_G);
  const at::Tensor starts = at::cat({at::zeros({1}, ends_G.options()), ends_G.narrow(0, 0, ends_G.size(0) - 1)});
  return grad.masked_fill_((ends_G == starts).view({-1, 1, 1}), 0);
}

class GroupedSwiGLUGroupedMm : public torch::autograd::Function<GroupedSwiGLUGroupedMm> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                            const at::Tensor& ends) {
    const int64_t ffn = w2.size(1);
    const at::Tensor h = at::_grouped_mm(x, w13, ends);
    const at::Tensor a = swiglu_output(h, ffn);
    ctx->save_for_backward({x, w13, w2, h, ends});
    return at::_grouped_mm(a, w2, ends);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w13 = saved[1], &w2 = saved[2], &h = saved[3], &ends = saved[4];
    const at::Tensor dy = grad_outputs[0].to(h.scalar_type()).contiguous();
    const at::Tensor da = at::_grouped_mm(dy, w2.transpose(1, 2), ends);
    const SwiGLUGrads swiglu_grads = swiglu_backward(h, da);
    const at::Tensor &dh = swiglu_grads.dh, &a = swiglu_grads.a;
    const at::Tensor dx = at::_grouped_mm(dh, w13.transpose(1, 2), ends);
    const auto weight_grads = [x, a, dy, dh, ends] {
      return std::vector<at::Tensor>{grouped_weight_grad(x, dh, ends), grouped_weight_grad(a, dy, ends)};
    };
    return with_weight_grads(dx, w13, w2, weight_grads, 1);
  }
};

// FP8 experts with one fp8::fp8_mm per GEMM and group: DeepSeek-V3's tiling,
// native block-scaled GEMMs on a GPU (each group's rows padded to 128 there,
// see MoEModel::forward), the emulation where the native GEMM does not apply.
// The weights stay FP32 masters; each product quantizes what it reads.
class GroupedSwiGLUFp8Gemms : public torch::autograd::Function<GroupedSwiGLUFp8Gemms> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w13, const at::Tensor& w2,
                            const std::vector<int64_t>& rows_per_group) {
    const int64_t ffn = w2.size(1);
    const at::TensorOptions fp32 = x.options().dtype(at::kFloat);
    at::Tensor h = at::empty({x.size(0), 2 * ffn}, fp32);
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      h.narrow(0, offset, rows).copy_(fp8::fp8_mm(x.narrow(0, offset, rows), w13[g].t(), /*b_blocks=*/true));
    });
    const at::Tensor a = swiglu_output(h, ffn);
    at::Tensor y = at::empty({x.size(0), w2.size(2)}, fp32);
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      y.narrow(0, offset, rows).copy_(fp8::fp8_mm(a.narrow(0, offset, rows), w2[g].t(), /*b_blocks=*/true));
    });
    ctx->save_for_backward({x, w13, w2, h});
    ctx->saved_data["rows"] = c10::IValue(rows_per_group);
    return y.to(x.scalar_type());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &w13 = saved[1], &w2 = saved[2], &h = saved[3];
    const std::vector<int64_t> rows_per_group = ctx->saved_data["rows"].toIntVector();
    const at::Tensor dy = grad_outputs[0].to(at::kFloat).contiguous();
    const int64_t ffn = w2.size(1);
    at::Tensor da = at::empty({x.size(0), ffn}, h.options());
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      da.narrow(0, offset, rows).copy_(fp8::fp8_mm(dy.narrow(0, offset, rows), w2[g], /*b_blocks=*/true));
    });
    const SwiGLUGrads swiglu_grads = swiglu_backward(h, da);
    const at::Tensor &dh = swiglu_grads.dh, &a = swiglu_grads.a;
    at::Tensor dx = at::empty({x.size(0), x.size(1)}, h.options());
    for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
      dx.narrow(0, offset, rows).copy_(fp8::fp8_mm(dh.narrow(0, offset, rows), w13[g], /*b_blocks=*/true));
    });
    const auto weight_grads = [x, h, a, dy, dh, rows_per_group, w13_shape = w13.sizes().vec(), w2_shape = w2.sizes().vec()] {
      at::Tensor dw2 = at::empty(w2_shape, h.options()), dw13 = at::empty(w13_shape, h.options());
      zero_empty_groups(dw2, rows_per_group);
      zero_empty_groups(dw13, rows_per_group);
      // Weight gradients reduce over the group's tokens: both operands in 1 x 128 tiles along them.
      for_each_group(rows_per_group, [&](int64_t g, int64_t offset, int64_t rows) {
        dw2[g].copy_(fp8::fp8_mm(a.narrow(0, offset, rows).t(), dy.narrow(0, offset, rows).t(), /*b_blocks=*/false));
        dw13[g].copy_(fp8::fp8_mm(x.narrow(0, offset, rows).t(), dh.narrow(0, offset, rows).t(), /*b_blocks=*/false));
      });
      return std::vector<at::Tensor>{dw13, dw2};
    };
    return with_weight_grads(dx.to(x.scalar_type()), w13, w2, weight_grads, 1);
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
  if (fp8 && !x_SD.device().is_cpu()) return grouped_swiglu_fp8_gemms(x_SD, w13_GD2F, w2_GFD, rows_per_group);
  return GroupedSwiGLU::apply(x_SD.contiguous(), w13_GD2F.contiguous(), w2_GFD.contiguous(), rows_per_group, fp8);
}

at::Tensor grouped_swiglu_fp8_gemms(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                                    const std::vector<int64_t>& rows_per_group) {
  check_shapes(x_SD, w13_GD2F, w2_GFD, rows_per_group, /*fp8=*/true);
  return GroupedSwiGLUFp8Gemms::apply(x_SD.contiguous(), w13_GD2F.contiguous(), w2_GFD.contiguous(), rows_per_group);
}

at::Tensor grouped_swiglu_grouped_mm(const at::Tensor& x_SD, const at::Tensor& w13_GD2F, const at::Tensor& w2_GFD,
                                     const at::Tensor& ends_G) {
  if (x_SD.dim() != 2 || w13_GD2F.dim() != 3 || w2_GFD.dim() != 3 || ends_G.dim() != 1 || ends_G.size(0) != w13_GD2F.size(0) ||
      ends_G.scalar_type() != at::kInt || x_SD.scalar_type() != w13_GD2F.scalar_type() || w13_GD2F.size(1) != x_SD.size(1) ||
      w13_GD2F.size(2) != 2 * w2_GFD.size(1) || w2_GFD.size(0) != w13_GD2F.size(0)) {
    throw std::invalid_argument("grouped_swiglu_grouped_mm: inconsistent shapes or dtypes");
  }
  return GroupedSwiGLUGroupedMm::apply(x_SD.contiguous(), w13_GD2F.contiguous(), w2_GFD.contiguous(), ends_G.contiguous());
}

at::Tensor group_ends(const std::vector<int64_t>& rows_per_group, c10::Device device) {
  std::vector<int32_t> ends(rows_per_group.size());
  int64_t total = 0;
  for (size_t g = 0; g < ends.size(); ++g) ends[g] = static_cast<int32_t>(total += rows_per_group[g]);
  const at::Tensor host = at::tensor(ends, at::kInt);
  return device.is_cpu() ? host : host.to(device, /*non_blocking=*/false);
}

namespace {

// The grouped path against the loop on a small problem with an empty group and
// uneven ones, forward and backward: LibTorch versions and GPUs differ in what
// their grouped kernel accepts, so it is used only where it agrees.
bool grouped_mm_agrees(c10::Device device, at::ScalarType dtype) {
  try {
    at::AutoGradMode grad_mode(true);  // the first forward may be a validation pass
    // A private generator: the probe leaves the training run's random streams untouched.
    at::Generator generator = at::detail::createCPUGenerator(20260101);
    const auto random = [&](at::IntArrayRef shape, double scale) {
      return (at::randn(shape, generator, at::TensorOptions().dtype(at::kFloat)) * scale).to(device, dtype);
    };
    const std::vector<int64_t> rows{5, 0, 19, 8};
    const at::Tensor x = random({32, 64}, 1.0), w13 = random({4, 64, 64}, 0.1), w2 = random({4, 32, 64}, 0.1),
                     dy = random({32, 64}, 1.0);
    std::vector<at::Tensor> grads[2];
    for (int path = 0; path < 2; ++path) {
      const at::Tensor xa = x.clone().requires_grad_(), a = w13.clone().requires_grad_(), b = w2.clone().requires_grad_();
      const at::Tensor y = path == 0 ? grouped_swiglu(xa, a, b, rows) : grouped_swiglu_grouped_mm(xa, a, b, group_ends(rows, device));
      y.backward(dy);
      grads[path] = {y.detach(), xa.grad(), a.grad(), b.grad()};
    }
    const double tolerance = dtype == at::kFloat ? 1e-4 : 3e-2;
    for (size_t i = 0; i < grads[0].size(); ++i) {
      const at::Tensor ref = grads[0][i].to(at::kFloat), got = grads[1][i].to(at::kFloat);
      if (!at::allclose(got, ref, tolerance, tolerance)) return false;
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace

bool use_grouped_mm(c10::Device device, at::ScalarType dtype, const std::string& forced) {
  if (forced == "off") return false;
  const bool force_on = forced == "on";
  if (!force_on && !(device.is_cuda() && dtype == at::kBFloat16)) return false;
  static std::mutex mutex;
  static std::map<std::pair<std::string, int>, bool> verdicts;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device.str(), static_cast<int>(dtype));
  auto it = verdicts.find(key);
  if (it == verdicts.end()) it = verdicts.emplace(key, grouped_mm_agrees(device, dtype)).first;
  return it->second;
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
