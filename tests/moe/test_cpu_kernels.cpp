// The fused CPU kernels (moe/cpu_kernels.h) against the unfused ATen
// compositions they replace: every instruction-set variant this CPU can run,
// FP32 within 1e-6 relative, BF16 within a few of its own roundings; the
// autograd nodes built on them (SwiGLU experts, RMSNorm with the residual add,
// the router's selection, the cross entropy) forward and backward.
#include <gtest/gtest.h>

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "common/cpu_isa.h"
#include "moe/cpu_kernels.h"
#include "moe/cross_entropy.h"
#include "moe/grouped_swiglu.h"
#include "moe/rms_norm.h"
#include "moe/router.h"

namespace {

using namespace fmoe::moe;

// The tables this CPU can execute (DEFAULT always).
std::vector<const CpuKernels*> runnable_tables() {
  return fmoe::common::runnable_copies(cpu_isa::kernels_DEFAULT(), cpu_isa::kernels_AVX2(), cpu_isa::kernels_AVX512());
}

// max |got - ref| <= rtol * max |ref|: relative to the tensor's scale, so that an
// element that cancels to near zero is held to the same absolute bound as the rest.
void expect_close(const at::Tensor& got, const at::Tensor& ref, double rtol, const std::string& what) {
  const at::Tensor g = got.to(at::kDouble), r = ref.to(at::kDouble);
  ASSERT_EQ(g.sizes(), r.sizes()) << what;
  const double scale = r.abs().max().item<double>();
  const double error = (g - r).abs().max().item<double>();
  EXPECT_LE(error, rtol * scale) << what << ": max error " << error << " against scale " << scale;
}

double tolerance(at::ScalarType dtype) { return dtype == at::kFloat ? 1e-6 : 2e-2; }

TEST(CpuKernels, TheDispatchedTableIsOneThisCpuRuns) {
  const std::string chosen = cpu_kernels().isa;
  bool found = false;
  for (const CpuKernels* t : runnable_tables()) found = found || chosen == t->isa;
  EXPECT_TRUE(found) << chosen;
}

TEST(CpuKernels, SwiGLUForwardAndBackwardMatchTheComposition) {
  torch::manual_seed(11);
  // 37: a tail shorter than one vector; 64: whole blocks.
  for (const int64_t ffn : {37, 64}) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      const at::Tensor h = (at::randn({29, 2 * ffn}) * 3).to(dtype), da = at::randn({29, ffn}).to(dtype);
      // The reference in FP32 from the same (rounded) inputs; the kernels round once on store.
      const at::Tensor hf = h.to(at::kFloat).requires_grad_(), gate = hf.narrow(1, 0, ffn), up = hf.narrow(1, ffn, ffn);
      const at::Tensor a_ref = at::silu(gate) * up;
      const at::Tensor dh_ref = torch::autograd::grad({a_ref}, {hf}, {da.to(at::kFloat)})[0];
      for (const CpuKernels* k : runnable_tables()) {
        const std::string what = std::string(k->isa) + " ffn " + std::to_string(ffn) + " " + c10::toString(dtype);
        at::Tensor a = at::empty({29, ffn}, h.options()), dh = at::empty_like(h), a2 = at::empty_like(a);
        k->swiglu_forward(h.data_ptr(), a.data_ptr(), 29, ffn, dtype == at::kBFloat16);
        k->swiglu_backward(h.data_ptr(), da.data_ptr(), dh.data_ptr(), a2.data_ptr(), 29, ffn, dtype == at::kBFloat16);
        expect_close(a, a_ref, tolerance(dtype), what + " a");
        expect_close(dh, dh_ref, tolerance(dtype), what + " dh");
        EXPECT_TRUE(at::equal(a, a2)) << what << ": the backward's a differs from the forward's";
      }
    }
  }
}

TEST(CpuKernels, RmsNormWithResidualMatchesTheComposition) {
  torch::manual_seed(12);
  const int64_t rows = 37;  // more than two blocks of the weight gradient's partial sums
  for (const int64_t dim : {40, 64}) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      const at::Tensor x = at::randn({rows, dim}) * 2, w = at::randn({dim}), delta = at::randn({rows, dim}).to(dtype);
      const at::Tensor g = at::randn({rows, dim}).to(dtype), g_sum = at::randn({rows, dim});
      const at::Tensor xr = x.clone().requires_grad_(), dr = delta.to(at::kFloat).requires_grad_(), wr = w.clone().requires_grad_();
      const at::Tensor s_ref = xr + dr;
      const at::Tensor y_ref = s_ref * (s_ref.square().mean(-1, true) + 1e-6).rsqrt() * wr;
      const auto grads = torch::autograd::grad({y_ref, s_ref}, {xr, wr}, {g.to(at::kFloat), g_sum});
      for (const CpuKernels* k : runnable_tables()) {
        const std::string what = std::string(k->isa) + " dim " + std::to_string(dim) + " " + c10::toString(dtype);
        at::Tensor s = at::empty_like(x), y = at::empty({rows, dim}, x.options().dtype(dtype)), r = at::empty({rows});
        k->rms_norm_forward(x.data_ptr<float>(), delta.data_ptr(), dtype == at::kBFloat16, w.data_ptr<float>(), 1e-6f, s.data_ptr<float>(),
                            y.data_ptr(), dtype == at::kBFloat16, r.data_ptr<float>(), rows, dim);
        expect_close(s, s_ref, 1e-7, what + " s");
        expect_close(y, y_ref, tolerance(dtype), what + " y");
        at::Tensor dx = at::empty_like(x), dw = at::empty({dim});
        k->rms_norm_backward(s.data_ptr<float>(), w.data_ptr<float>(), r.data_ptr<float>(), g.data_ptr(), dtype == at::kBFloat16,
                             g_sum.data_ptr<float>(), dx.data_ptr<float>(), dw.data_ptr<float>(), rows, dim);
        expect_close(dx, grads[0], 1e-6, what + " dx");
        expect_close(dw, grads[1], 1e-6, what + " dw");
      }
    }
  }
}

TEST(CpuKernels, RmsNormWeightGradientDoesNotDependOnTheThreadCount) {
  torch::manual_seed(13);
  const at::Tensor s = at::randn({100, 48}), w = at::randn({48}), r = at::rand({100}) + 0.5, g = at::randn({100, 48});
  std::vector<at::Tensor> dws;
  const int threads = at::get_num_threads();
  for (const int n : {1, 2, 3}) {
    at::set_num_threads(n);
    at::Tensor dx = at::empty_like(s), dw = at::empty({48});
    cpu_kernels().rms_norm_backward(s.data_ptr<float>(), w.data_ptr<float>(), r.data_ptr<float>(), g.data_ptr(), false, nullptr,
                                    dx.data_ptr<float>(), dw.data_ptr<float>(), 100, 48);
    dws.push_back(dw);
  }
  at::set_num_threads(threads);
  EXPECT_TRUE(at::equal(dws[0], dws[1]));
  EXPECT_TRUE(at::equal(dws[0], dws[2]));
}

TEST(CpuKernels, RouteSelectMatchesGroupMaskAndTopK) {
  torch::manual_seed(14);
  for (const bool sigmoid : {true, false}) {
    RouterOptions o;
    o.score_function = sigmoid ? ScoreFunction::kSigmoid : ScoreFunction::kSoftmax;
    o.top_k = 3;
    o.num_groups = 4;
    o.group_top_k = 2;
    const at::Tensor scores = at::rand({50, 16}), bias = at::randn({16}) * 0.1;
    at::Tensor selection = scores + bias;
    selection = selection.masked_fill(group_limited_mask(selection, o).logical_not(), -std::numeric_limits<float>::infinity());
    const at::Tensor ref = std::get<1>(selection.topk(o.top_k, -1));
    for (const CpuKernels* k : runnable_tables()) {
      at::Tensor got = at::empty({50, 3}, at::kLong);
      k->route_select(scores.data_ptr<float>(), bias.data_ptr<float>(), 50, 16, 4, 2, 3, sigmoid, got.data_ptr<int64_t>());
      EXPECT_TRUE(at::equal(got, ref)) << k->isa << (sigmoid ? " sigmoid" : " softmax");
    }
  }
}

TEST(CpuKernels, RouteSelectBreaksTiesTowardsTheLowerExpert) {
  // Every score equal: experts 0, 1 (group 0 wins the tie with group 1).
  const at::Tensor scores = at::full({2, 8}, 0.5f), bias = at::zeros({8});
  at::Tensor got = at::empty({2, 2}, at::kLong);
  cpu_kernels().route_select(scores.data_ptr<float>(), bias.data_ptr<float>(), 2, 8, 4, 1, 2, true, got.data_ptr<int64_t>());
  EXPECT_TRUE(at::equal(got, at::tensor({0, 1, 0, 1}, at::kLong).view({2, 2})));
}

TEST(CpuKernels, CrossEntropyMatchesLogSumExpAndSoftmax) {
  torch::manual_seed(14);
  // 37 and 1000: a tail shorter than one block; 8192: the default vocabulary, whole blocks.
  for (const int64_t vocab : {37, 1000, 8192}) {
    for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
      const int64_t rows = 23;
      // Large logits: the maximum must be subtracted before exp.
      const at::Tensor logits = (at::randn({rows, vocab}) * 4 + 60).to(dtype);
      at::Tensor targets = at::randint(vocab, {rows}, at::kLong);
      targets[0] = 0;
      targets[1] = vocab - 1;  // the one-hot term in the first and in the last (tail) block
      const at::Tensor ld = logits.to(at::kDouble);
      const at::Tensor lse_ref = at::logsumexp(ld, {1});
      const at::Tensor target_ref = ld.gather(1, targets.unsqueeze(1)).squeeze(1);
      const double scale = 0.37;
      for (const CpuKernels* k : runnable_tables()) {
        const std::string what = std::string(k->isa) + " vocab " + std::to_string(vocab) + " " + c10::toString(dtype);
        at::Tensor lse = at::empty({rows}), target_logit = at::empty({rows}), grad = at::empty_like(logits);
        k->cross_entropy_forward(logits.data_ptr(), dtype == at::kBFloat16, targets.data_ptr<int64_t>(), rows, vocab, lse.data_ptr<float>(),
                                 target_logit.data_ptr<float>());
        // The forward is computed in FP32 from the exact inputs in both dtypes.
        expect_close(lse, lse_ref, 1e-6, what + " lse");
        EXPECT_TRUE(at::equal(target_logit, target_ref.to(at::kFloat))) << what << " target logit";
        k->cross_entropy_backward(logits.data_ptr(), dtype == at::kBFloat16, targets.data_ptr<int64_t>(), lse.data_ptr<float>(),
                                  static_cast<float>(scale), grad.data_ptr(), rows, vocab);
        // The reference gradient from the same stored (FP32) lse, as the unfused
        // path uses it; its scale is the one-hot term.
        const at::Tensor lse_d = lse.to(at::kDouble).unsqueeze(1);
        const at::Tensor grad_ref = (at::exp(ld - lse_d) - at::one_hot(targets, vocab).to(at::kDouble)) * scale;
        const double rtol = dtype == at::kFloat ? 1e-6 : 1e-2;
        const double error = (grad.to(at::kDouble) - grad_ref).abs().max().item<double>();
        EXPECT_LE(error, rtol * scale) << what << " grad: max error " << error;
        // Each row sums to zero up to the FP32 rounding of lse (a relative 2^-24 of
        // |lse| shifts every exp by that factor) and the gradient's own rounding.
        const double row_sum_bound = scale * (lse.abs().max().item<double>() * std::ldexp(1.0, -23) + (dtype == at::kFloat ? 1e-6 : 2e-2));
        EXPECT_LE(grad.to(at::kDouble).sum(1).abs().max().item<double>(), row_sum_bound) << what;
      }
    }
  }
}

TEST(CpuKernels, CrossEntropyRejectsATargetOutsideTheVocabulary) {
  const at::Tensor logits = at::randn({4, 10});
  const at::Tensor targets = at::tensor({1, 2, 10, 3}, at::kLong);
  EXPECT_THROW(chunked_cross_entropy(logits, targets), c10::Error);
  EXPECT_THROW(chunked_cross_entropy(logits, at::tensor({1, -1, 0, 3}, at::kLong)), c10::Error);
}

TEST(CpuKernels, AddRmsNormNodeMatchesTheAutogradComposition) {
  torch::manual_seed(15);
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor x = at::randn({2, 9, 32}), delta = at::randn({2, 9, 32}).to(dtype), w = at::randn({32});
    const at::Tensor gy = at::randn({2, 9, 32}).to(dtype), gs = at::randn({2, 9, 32});
    const at::Tensor xa = x.clone().requires_grad_(), da = delta.clone().requires_grad_(), wa = w.clone().requires_grad_();
    const auto [s, y] = add_rms_norm(xa, da, wa, 1e-6, dtype);
    const auto got = torch::autograd::grad({y, s}, {xa, da, wa}, {gy, gs});
    const at::Tensor xb = x.clone().requires_grad_(), db = delta.clone().requires_grad_(), wb = w.clone().requires_grad_();
    const at::Tensor s_ref = xb + db.to(at::kFloat);
    const at::Tensor y_ref = rms_norm_reference(s_ref, wb, 1e-6, dtype);
    const auto ref = torch::autograd::grad({y_ref, s_ref}, {xb, db, wb}, {gy, gs});
    ASSERT_EQ(y.scalar_type(), dtype);
    EXPECT_TRUE(at::equal(s, s_ref));
    expect_close(y, y_ref, dtype == at::kFloat ? 1e-6 : 1e-2, "y");
    for (size_t i = 0; i < 3; ++i) {
      ASSERT_EQ(got[i].scalar_type(), ref[i].scalar_type()) << i;
      expect_close(got[i], ref[i], dtype == at::kFloat ? 1e-6 : 1e-2, "grad " + std::to_string(i));
    }
  }
}

TEST(CpuKernels, GroupedSwiGLUNodeMatchesThePerRowReferenceInFp32AndBf16) {
  torch::manual_seed(16);
  const std::vector<int64_t> rows = {4, 0, 7, 2};
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor x = at::randn({13, 16}).to(dtype), w13 = (at::randn({4, 16, 40}) * 0.3).to(dtype), w2 = (at::randn({4, 20, 16}) * 0.3).to(dtype);
    const at::Tensor dy = at::randn({13, 16}).to(dtype);
    const at::Tensor xa = x.clone().requires_grad_(), a13 = w13.clone().requires_grad_(), a2 = w2.clone().requires_grad_();
    const at::Tensor y = grouped_swiglu(xa, a13, a2, rows);
    const auto got = torch::autograd::grad({y}, {xa, a13, a2}, {dy});
    // The reference in FP32 from the same inputs.
    const at::Tensor xb = x.to(at::kFloat).requires_grad_(), b13 = w13.to(at::kFloat).requires_grad_(), b2 = w2.to(at::kFloat).requires_grad_();
    const at::Tensor y_ref = grouped_swiglu_reference(xb, b13, b2, rows);
    const auto ref = torch::autograd::grad({y_ref}, {xb, b13, b2}, {dy.to(at::kFloat)});
    const double tol = dtype == at::kFloat ? 1e-6 : 3e-2;
    expect_close(y, y_ref, tol, "y");
    for (size_t i = 0; i < 3; ++i) expect_close(got[i], ref[i], tol, "grad " + std::to_string(i));
  }
}

}  // namespace
