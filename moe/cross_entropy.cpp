#include "moe/cross_entropy.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "moe/cpu_kernels.h"

namespace fmoe::moe {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The fused CPU kernels take contiguous BF16 or FP32 rows; everything else goes
// through the chunked ATen composition.
bool use_fused(const at::Tensor& logits, const at::Tensor& targets) {
  return logits.is_cpu() && fused_cpu_kernels_enabled() && logits.dim() == 2 && logits.is_contiguous() &&
         (logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16) && targets.scalar_type() == at::kLong &&
         targets.is_contiguous();
}

class ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& targets, int64_t chunk) {
    const int64_t rows = logits.size(0);
    at::Tensor lse = at::empty({rows}, logits.options().dtype(at::kFloat)), target_logits;
    if (use_fused(logits, targets)) {
      // The kernel reads the target's logit by address: a target outside the
      // vocabulary must fail here, as gather would.
      if (rows > 0) {
        const auto [lo, hi] = at::aminmax(targets);
        TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < logits.size(1), "cross entropy: a target is outside [0, ",
                    logits.size(1), ")");
      }
      target_logits = at::empty({rows}, lse.options());
      cpu_kernels().cross_entropy_forward(logits.data_ptr(), logits.scalar_type() == at::kBFloat16, targets.data_ptr<int64_t>(), rows,
                                          logits.size(1), lse.data_ptr<float>(), target_logits.data_ptr<float>());
    } else {
      for (int64_t start = 0; start < rows; start += chunk) {
        const int64_t n = std::min(chunk, rows - start);
        at::Tensor out = lse.narrow(0, start, n);
        at::logsumexp_out(out, logits.narrow(0, start, n).to(at::kFloat), {1}, false);
      }
      target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1).to(at::kFloat);
    }
    ctx->save_for_backward({logits, targets, lse});
    ctx->saved_data["chunk"] = chunk;
    return (lse - target_logits).mean();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor& logits = saved[0];
    const at::Tensor& targets = saved[1];
    const at::Tensor& lse = saved[2];
    const int64_t chunk = ctx->saved_data["chunk"].toInt();
    const int64_t rows = logits.size(0);
    // d loss / d logits = (softmax - onehot) * grad / N
    // The incoming gradient stays a device scalar: reading it back would stall a GPU.
    const at::Tensor scale = grad_outputs[0].to(at::kFloat) / static_cast<double>(rows);
    at::Tensor grad = at::empty_like(logits);
    if (use_fused(logits, targets)) {  // on the CPU the incoming scalar can be read without a stall
      const float scale = grad_outputs[0].item<float>() / static_cast<float>(rows);
      cpu_kernels().cross_entropy_backward(logits.data_ptr(), logits.scalar_type() == at::kBFloat16, targets.data_ptr<int64_t>(),
                                           lse.data_ptr<float>(), scale, grad.data_ptr(), rows, logits.size(1));
      return {grad, at::Tensor(), at::Tensor()};
    }
    const bool fp32 = logits.scalar_type() == at::kFloat;  // then each chunk is computed in place in grad
    const at::Tensor minus_one = at::full({chunk, 1}, -1.0f, logits.options().dtype(at::kFloat));
    for (int64_t start = 0; start < rows; start += chunk) {
      const int64_t n = std::min(chunk, rows - start);
      at::Tensor p = fp32 ? grad.narrow(0, start, n) : at::empty({n, logits.size(1)}, logits.options().dtype(at::kFloat));
      at::sub_out(p, logits.narrow(0, start, n), lse.narrow(0, start, n).unsqueeze(1)).exp_();
      p.scatter_add_(1, targets.narrow(0, start, n).unsqueeze(1), minus_one.narrow(0, 0, n));
      p.mul_(scale);
      if (!fp32) grad.narrow(0, start, n).copy_(p);
    }
    return {grad, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor chunked_cross_entropy(const at::Tensor& logits_NV, const at::Tensor& targets_N, int64_t chunk_rows) {
  return ChunkedCrossEntropy::apply(logits_NV.contiguous(), targets_N.contiguous(), chunk_rows);
}

}  // namespace fmoe::moe
