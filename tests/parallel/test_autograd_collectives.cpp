// The differentiable collectives: forward values and input gradients against
// closed forms computed on every rank from the same seeds.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/torch.h>

#include "parallel/autograd.h"
#include "tests/parallel/mpi_test_env.h"

namespace {

using namespace fmoe::parallel;
using fmoe::testing::world;

// The same tensor on every rank that asks for (seed, rank).
at::Tensor seeded(std::vector<int64_t> shape, int64_t seed) {
  at::manual_seed(seed);
  return at::randn(shape, at::kDouble);
}

at::Tensor leaf(const at::Tensor& t) { return t.clone().requires_grad_(true); }

TEST(AutogradCollectives, CopyToGroupSumsGradients) {
  const int64_t r = world().rank(), n = world().size();
  at::Tensor x = leaf(seeded({4, 3}, 1));
  (copy_to_group(x, world()) * seeded({4, 3}, 100 + r)).sum().backward();
  at::Tensor expected = at::zeros({4, 3}, at::kDouble);
  for (int64_t q = 0; q < n; ++q) expected += seeded({4, 3}, 100 + q);
  EXPECT_TRUE(at::allclose(x.grad(), expected, 1e-12, 1e-12));
}

TEST(AutogradCollectives, ReduceFromGroupPassesGradients) {
  const int64_t r = world().rank(), n = world().size();
  at::Tensor x = leaf(seeded({5}, 10 + r));
  at::Tensor y = reduce_from_group(x, world());
  at::Tensor expected = at::zeros({5}, at::kDouble);
  for (int64_t q = 0; q < n; ++q) expected += seeded({5}, 10 + q);
  EXPECT_TRUE(at::allclose(y, expected, 1e-12, 1e-12));
  const at::Tensor w = seeded({5}, 7);
  (y * w).sum().backward();
  EXPECT_TRUE(at::equal(x.grad(), w));
}

TEST(AutogradCollectives, AllGatherAlongAnyDimAndItsTwoBackwards) {
  const int64_t r = world().rank(), n = world().size();
  for (bool reduce_scatter_grad : {false, true}) {
    at::Tensor x = leaf(seeded({2, 3, 2}, 20 + r));
    at::Tensor y = all_gather_along(x, 1, world(), reduce_scatter_grad);
    std::vector<at::Tensor> parts;
    for (int64_t q = 0; q < n; ++q) parts.push_back(seeded({2, 3, 2}, 20 + q));
    EXPECT_TRUE(at::equal(y, at::cat(parts, 1)));
    // Same upstream weight on every rank without reduce-scatter; rank-specific with it.
    const at::Tensor w = seeded({2, 3 * n, 2}, reduce_scatter_grad ? 30 + r : 30);
    (y * w).sum().backward();
    at::Tensor expected = w.narrow(1, 3 * r, 3);
    if (reduce_scatter_grad) {
      expected = at::zeros({2, 3, 2}, at::kDouble);
      for (int64_t q = 0; q < n; ++q) expected += seeded({2, 3 * n, 2}, 30 + q).narrow(1, 3 * r, 3);
    }
    EXPECT_TRUE(at::allclose(x.grad(), expected, 1e-12, 1e-12)) << reduce_scatter_grad;
  }
}

TEST(AutogradCollectives, ScatterAlongGathersGradients) {
  const int64_t r = world().rank(), n = world().size();
  at::Tensor x = leaf(seeded({3, 2 * n}, 40));
  at::Tensor y = scatter_along(x, -1, world());
  EXPECT_TRUE(at::equal(y, seeded({3, 2 * n}, 40).narrow(1, 2 * r, 2)));
  (y * seeded({3, 2}, 50 + r)).sum().backward();
  std::vector<at::Tensor> parts;
  for (int64_t q = 0; q < n; ++q) parts.push_back(seeded({3, 2}, 50 + q));
  EXPECT_TRUE(at::equal(x.grad(), at::cat(parts, 1)));
}

TEST(AutogradCollectives, ReduceScatterAlongGathersGradients) {
  const int64_t r = world().rank(), n = world().size();
  at::Tensor x = leaf(seeded({2 * n, 3}, 60 + r));
  at::Tensor y = reduce_scatter_along(x, 0, world());
  at::Tensor expected = at::zeros({2, 3}, at::kDouble);
  for (int64_t q = 0; q < n; ++q) expected += seeded({2 * n, 3}, 60 + q).narrow(0, 2 * r, 2);
  EXPECT_TRUE(at::allclose(y, expected, 1e-12, 1e-12));
  (y * seeded({2, 3}, 70 + r)).sum().backward();
  std::vector<at::Tensor> parts;
  for (int64_t q = 0; q < n; ++q) parts.push_back(seeded({2, 3}, 70 + q));
  EXPECT_TRUE(at::equal(x.grad(), at::cat(parts, 0)));
}

TEST(AutogradCollectives, AllToAllRowsBackwardIsTheReverseExchange) {
  const int64_t r = world().rank(), n = world().size();
  const auto rows = [](int64_t src, int64_t dst) { return (2 * src + dst) % 3; };  // some zero
  std::vector<int64_t> in_splits, out_splits;
  int64_t in_rows = 0, out_rows = 0;
  for (int64_t q = 0; q < n; ++q) {
    in_splits.push_back(rows(r, q));
    out_splits.push_back(rows(q, r));
    in_rows += in_splits.back();
    out_rows += out_splits.back();
  }
  at::Tensor x = leaf(seeded({in_rows, 4}, 80 + r));
  at::Tensor y = all_to_all_rows(x, out_splits, in_splits, world());
  ASSERT_EQ(y.size(0), out_rows);
  // Upstream gradient: row j of y on rank r gets weight (r + 1) * (j + 1).
  const at::Tensor weight = (r + 1) * (at::arange(out_rows, at::kDouble) + 1);
  (y * weight.unsqueeze(1)).sum().backward();
  // Row i of x on rank r went to rank dst at position (rows from ranks < r to dst) + offset.
  int64_t row = 0;
  for (int64_t dst = 0; dst < n; ++dst) {
    int64_t before = 0;
    for (int64_t src = 0; src < r; ++src) before += rows(src, dst);
    for (int64_t i = 0; i < in_splits[dst]; ++i, ++row) {
      const double w = static_cast<double>((dst + 1) * (before + i + 1));
      EXPECT_TRUE(at::allclose(x.grad()[row], at::full({4}, w, at::kDouble))) << "row " << row;
    }
  }
}

}  // namespace
