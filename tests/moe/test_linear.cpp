// The model's linear node, plain and FP8 (DeepSeek-V3's recipe), and the
// backward split of every weight-bearing node (moe/weight_grad.h): inside a
// DeferWeightGrads scope a backward yields the input gradient alone; running the
// queue then yields weight gradients bit-identical to the undivided backward,
// accumulated over micro-batches, through casts, with the parameter hooks fired
// once per weight.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cmath>
#include <functional>

#include "fp8/fp8_gemm.h"
#include "moe/grouped_swiglu.h"
#include "moe/linear.h"
#include "moe/weight_grad.h"

namespace {

using namespace fmoe::fp8;
using namespace fmoe::moe;

TEST(Linear, PlainMatchesAtLinear) {
  torch::manual_seed(3);
  const at::Tensor x = at::randn({2, 7, 24}).requires_grad_(), w = at::randn({10, 24}).requires_grad_();
  const at::Tensor dy = at::randn({2, 7, 10});
  const at::Tensor y = deferrable_linear(x, w);
  const at::Tensor ref = at::linear(x, w);
  EXPECT_TRUE(at::allclose(y, ref, 1e-6, 1e-6));
  const auto g = torch::autograd::grad({y}, {x, w}, {dy});
  const auto r = torch::autograd::grad({ref}, {x, w}, {dy});
  EXPECT_TRUE(at::allclose(g[0], r[0], 1e-5, 1e-6));
  EXPECT_TRUE(at::allclose(g[1], r[1], 1e-5, 1e-6));
  EXPECT_THROW(deferrable_linear(x, at::randn({10, 23})), std::invalid_argument);
}

TEST(Linear, Fp8GemmsUseTheRecipeAndStayWithinTheQuantizationBound) {
  torch::manual_seed(6);
  const at::Tensor x = at::randn({2, 150, 300}).requires_grad_();
  const at::Tensor w = (at::randn({200, 300}) * 0.05).requires_grad_();
  const at::Tensor y = deferrable_linear(x, w, /*fp8=*/true);
  ASSERT_EQ(y.sizes(), (std::vector<int64_t>{2, 150, 200}));
  const at::Tensor x2 = x.detach().reshape({300, 300});
  // Exactly the emulated recipe.
  const at::Tensor expected = at::mm(quantize_rowwise(x2), quantize_blockwise(w.detach()).t());
  EXPECT_TRUE(at::allclose(y.detach().reshape({300, 200}), expected, 1e-6, 1e-6));
  // Against FP32: each product carries at most (1 + 2^-4)^2 - 1 relative error.
  const at::Tensor exact = at::mm(x2, w.detach().t());
  const at::Tensor bound = at::mm(x2.abs(), w.detach().abs().t()) * (std::pow(1 + std::ldexp(1.0, -4), 2) - 1) + 1e-6;
  EXPECT_TRUE(((y.detach().reshape({300, 200}) - exact).abs() <= bound).all().item<bool>());

  const at::Tensor dy = at::randn({2, 150, 200});
  const auto grads = torch::autograd::grad({y}, {x, w}, {dy});
  const at::Tensor dy2 = dy.reshape({300, 200});
  const at::Tensor dx = at::mm(quantize_rowwise(dy2), quantize_blockwise(w.detach()));
  const at::Tensor dw = at::mm(quantize_colwise(dy2).t(), quantize_colwise(x2));
  EXPECT_TRUE(at::allclose(grads[0].reshape({300, 300}), dx, 1e-6, 1e-6));
  EXPECT_TRUE(at::allclose(grads[1], dw, 1e-5, 1e-5));
  EXPECT_LT(((grads[1] - at::mm(dy2.t(), x2)).norm() / at::mm(dy2.t(), x2).norm()).item<double>(), 0.05);
}

// One node under test: its forward from (x, weights...) to an output.
struct Case {
  std::string name;
  std::vector<at::Tensor> weights;  // FP32 leaves
  std::function<at::Tensor(const at::Tensor& x, const std::vector<at::Tensor>& w)> forward;
};

std::vector<Case> cases() {
  torch::manual_seed(17);
  const std::vector<int64_t> rows{5, 0, 19, 8};
  const at::Tensor ends = group_ends(rows, at::kCPU);
  const auto experts = [] { return std::vector<at::Tensor>{at::randn({4, 32, 48}) * 0.1, at::randn({4, 24, 32}) * 0.1}; };
  return {
      {"linear", {at::randn({20, 32}) * 0.1}, [](const at::Tensor& x, const auto& w) { return deferrable_linear(x, w[0]); }},
      {"linear through a BF16 cast", {at::randn({20, 32}) * 0.1},
       [](const at::Tensor& x, const auto& w) { return deferrable_linear(x.to(at::kBFloat16), w[0].to(at::kBFloat16)).to(at::kFloat); }},
      {"linear fp8", {at::randn({20, 32}) * 0.1}, [](const at::Tensor& x, const auto& w) { return deferrable_linear(x, w[0], true); }},
      {"grouped swiglu", experts(), [rows](const at::Tensor& x, const auto& w) { return grouped_swiglu(x, w[0], w[1], rows); }},
      {"grouped swiglu fp8", experts(), [rows](const at::Tensor& x, const auto& w) { return grouped_swiglu(x, w[0], w[1], rows, true); }},
      {"grouped swiglu fp8 gemms", experts(),
       [rows](const at::Tensor& x, const auto& w) { return grouped_swiglu_fp8_gemms(x, w[0], w[1], rows); }},
      {"grouped swiglu grouped_mm", experts(),
       [ends](const at::Tensor& x, const auto& w) { return grouped_swiglu_grouped_mm(x, w[0], w[1], ends); }},
  };
}

TEST(WeightGradDeferral, SplitBackwardEqualsTheUndividedOneForEveryWeightNode) {
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const at::Tensor x = at::randn({32, 32});
    const std::vector<at::Tensor> dys{at::randn({32, c.weights[0].dim() == 2 ? 20 : 32}), at::randn({32, c.weights[0].dim() == 2 ? 20 : 32})};
    // Undivided: two micro-batches accumulate.
    std::vector<at::Tensor> w_ref, w_split;
    for (const at::Tensor& w : c.weights) w_ref.push_back(w.clone().requires_grad_()), w_split.push_back(w.clone().requires_grad_());
    std::vector<at::Tensor> dx_ref, dx_split;
    for (const at::Tensor& dy : dys) {
      const at::Tensor xr = x.clone().requires_grad_();
      c.forward(xr, w_ref).backward(dy);
      dx_ref.push_back(xr.grad());
    }
    // Split: both micro-batches' input gradients first, then the queued weight gradients.
    int hooks = 0;
    // Autograd calls a leaf's hooks with an undefined gradient where a node returned none.
    for (at::Tensor& w : w_split) w.register_hook([&hooks](const at::Tensor& g) { hooks += g.defined(); });
    WeightGradQueue queue;
    for (const at::Tensor& dy : dys) {
      const at::Tensor xs = x.clone().requires_grad_();
      const at::Tensor y = c.forward(xs, w_split);
      {
        DeferWeightGrads defer(queue);
        y.backward(dy);
      }
      dx_split.push_back(xs.grad());
    }
    EXPECT_EQ(weight_grad_queue(), nullptr);
    EXPECT_EQ(queue.size(), 2u);
    for (const at::Tensor& w : w_split) EXPECT_FALSE(w.grad().defined());
    EXPECT_EQ(hooks, 0);
    for (size_t i = 0; i < dys.size(); ++i) EXPECT_TRUE(at::equal(dx_split[i], dx_ref[i]));
    queue.run();
    EXPECT_TRUE(queue.empty());
    EXPECT_EQ(hooks, static_cast<int>(w_split.size()));  // one delivery: both micro-batches' sum
    for (size_t i = 0; i < w_split.size(); ++i) {
      ASSERT_TRUE(w_split[i].grad().defined());
      EXPECT_TRUE(at::equal(w_split[i].grad(), w_ref[i].grad())) << "weight " << i;
      EXPECT_GT(w_split[i].grad().abs().sum().item<double>(), 0);
    }
  }
}

}  // namespace
