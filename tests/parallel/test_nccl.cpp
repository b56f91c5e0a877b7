// The NCCL backend against closed forms on CUDA tensors. Without a GPU (or with
// more ranks than GPUs: NCCL needs one GPU per rank) every test is skipped with
// a visible SKIPPED line; scripts/gpu_check.sh runs it on a GPU machine.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <torch/torch.h>

#include "moe/dispatch.h"
#include "moe/expert_parallel.h"
#include "moe/grouped_swiglu.h"
#include "parallel/nccl/nccl_communicator.h"
#include "tests/parallel/mpi_test_env.h"

namespace {

using namespace fmoe::parallel;
using fmoe::testing::world;

class Nccl : public ::testing::Test {
 protected:
  void SetUp() override {
    const int devices = cuda_device_count();
    if (devices == 0 || devices < world().size()) {
      if (world().rank() == 0) std::printf("SKIPPED: the NCCL backend needs one GPU per rank (%d visible, %d ranks)\n", devices, world().size());
      GTEST_SKIP();
    }
    static std::unique_ptr<Communicator> shared = make_nccl_communicator(world());
    nccl_ = shared.get();
  }
  Communicator* nccl_ = nullptr;
};

at::Tensor on_gpu(const at::Tensor& t) { return t.to(at::Device(at::kCUDA, 0)); }

TEST_F(Nccl, AllReduceEveryOpAndDtype) {
  const int64_t r = nccl_->rank(), n = nccl_->size();
  for (at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kLong}) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kMax, ReduceOp::kAvg}) {
      if (op == ReduceOp::kAvg && dtype == at::kLong) continue;
      at::Tensor t = on_gpu((at::arange(8, at::kLong) + r + 1).to(dtype));
      nccl_->all_reduce(t, {op})->wait();
      at::Tensor expected = at::arange(8, at::kDouble) * (op == ReduceOp::kSum ? n : 1);
      expected += op == ReduceOp::kSum ? n * (n + 1) / 2.0 : (op == ReduceOp::kMax ? n : (n + 1) / 2.0);
      EXPECT_TRUE(at::equal(t.cpu().to(at::kDouble), expected)) << c10::toString(dtype) << " " << static_cast<int>(op);
    }
  }
}

TEST_F(Nccl, GatherScatterBroadcastAndAllToAll) {
  const int64_t r = nccl_->rank(), n = nccl_->size();
  at::Tensor in = on_gpu(at::full({4}, static_cast<float>(r)));
  at::Tensor gathered = on_gpu(at::empty({4 * n}));
  nccl_->all_gather(gathered, in, {})->wait();
  EXPECT_TRUE(at::equal(gathered.cpu(), at::arange(n, at::kFloat).repeat_interleave(4)));
  at::Tensor blocks = on_gpu(at::arange(4 * n, at::kFloat));
  at::Tensor mine = on_gpu(at::empty({4}));
  nccl_->reduce_scatter(mine, blocks, {ReduceOp::kSum})->wait();
  EXPECT_TRUE(at::equal(mine.cpu(), (at::arange(4, at::kFloat) + 4 * r) * n));
  at::Tensor b = on_gpu(at::full({3}, static_cast<float>(r + 7)));
  nccl_->broadcast(b, {0})->wait();
  EXPECT_TRUE(at::equal(b.cpu(), at::full({3}, 7.0f)));
  // Uneven splits: rank r sends (r + dst) % 2 + 1 rows of [src, dst] to dst.
  std::vector<int64_t> in_splits, out_splits;
  std::vector<at::Tensor> rows;
  for (int64_t d = 0; d < n; ++d) {
    in_splits.push_back((r + d) % 2 + 1);
    out_splits.push_back((d + r) % 2 + 1);
    for (int64_t i = 0; i < in_splits.back(); ++i) rows.push_back(at::tensor({static_cast<float>(r), static_cast<float>(d)}).view({1, 2}));
  }
  const at::Tensor send = on_gpu(at::cat(rows));
  int64_t total = 0;
  for (int64_t s : out_splits) total += s;
  at::Tensor recv = on_gpu(at::empty({total, 2}));
  nccl_->all_to_all(recv, send, out_splits, in_splits, {})->wait();
  const at::Tensor host = recv.cpu();
  int64_t row = 0;
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t i = 0; i < out_splits[s]; ++i, ++row) {
      EXPECT_EQ(host[row][0].item<float>(), static_cast<float>(s));
      EXPECT_EQ(host[row][1].item<float>(), static_cast<float>(r));
    }
  }
}

// A real MoE step's communication on device tensors: the expert all-to-all
// (counts exchange, then rows, forward and backward) over NCCL with every
// expert's rows, then the gradient all-reduce; against the same experts run
// without communication. At one rank (gpu_check.sh) the exchange is with itself.
// A pipeline's sends and receives as one NCCL group: each rank sends to both
// neighbours and receives from both (at two ranks, one peer, two messages each
// way paired by issue order), where one at a time on the stream would hang.
TEST_F(Nccl, SendRecvGroupBothWaysAroundARing) {
  const int r = nccl_->rank(), n = nccl_->size();
  if (n < 2) {
    if (r == 0) std::printf("SKIPPED: a send/receive group needs two ranks (one GPU each)\n");
    GTEST_SKIP();
  }
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  const at::Tensor forward = on_gpu(at::full({1 << 16}, static_cast<float>(r))), backward = on_gpu(at::full({3}, static_cast<float>(10 * r)));
  at::Tensor from_prev = at::empty_like(forward), from_next = at::empty_like(backward);
  nccl_->send_recv({{true, forward, next}, {true, backward, prev}, {false, from_prev, prev}, {false, from_next, next}})->wait();
  EXPECT_TRUE(at::all(from_prev.cpu() == static_cast<float>(prev)).item<bool>());
  EXPECT_TRUE(at::all(from_next.cpu() == static_cast<float>(10 * next)).item<bool>());
}

TEST_F(Nccl, ExpertAllToAllAndGradientAllReduceOfARealStep) {
  const int64_t n = nccl_->size();
  const at::Device cuda(at::kCUDA, 0);
  torch::manual_seed(7);  // the same weights on every rank; each rank its own tokens below
  const int64_t experts = 4 * n, hidden = 32, ffn = 16, tokens = 24, k = 2;
  const at::Tensor w13_all = (at::randn({experts, hidden, 2 * ffn}) * 0.1).to(cuda);
  const at::Tensor w2_all = (at::randn({experts, ffn, hidden}) * 0.1).to(cuda);
  torch::manual_seed(100 + nccl_->rank());
  const at::Tensor x = at::randn({tokens, hidden}).to(cuda);
  const at::Tensor chosen = std::get<1>(at::rand({tokens, experts}).topk(k, -1)).to(cuda);
  const at::Tensor probs = at::rand({tokens, k}).to(cuda);
  const int64_t local = experts / n, first = nccl_->rank() * local;

  // Through NCCL: this rank's experts are [first, first + local).
  const at::Tensor w13 = w13_all.narrow(0, first, local).clone().requires_grad_();
  const at::Tensor w2 = w2_all.narrow(0, first, local).clone().requires_grad_();
  const at::Tensor xa = x.clone().requires_grad_();
  const fmoe::moe::ExpertCompute compute = [&](const at::Tensor& rows_x, const std::vector<int64_t>& rows) {
    return fmoe::moe::grouped_swiglu(rows_x, w13, w2, rows);
  };
  const std::unique_ptr<Communicator> tp = nccl_->split(static_cast<int>(nccl_->rank()), 0);  // a group of one
  const at::Tensor out = fmoe::moe::dispatch_all_to_all(xa, chosen, probs, experts, compute, *nccl_, *tp, {});
  out.square().sum().backward();
  // The data-parallel gradient reduction of the expert weights, as a bucket.
  at::Tensor bucket = at::cat({w13.grad().reshape({-1}), w2.grad().reshape({-1})}).contiguous();
  nccl_->all_reduce(bucket, {ReduceOp::kSum})->wait();

  // Locally, all experts on this rank's own tokens.
  const at::Tensor w13_ref = w13_all.clone().requires_grad_(), w2_ref = w2_all.clone().requires_grad_();
  const at::Tensor x_ref = x.clone().requires_grad_();
  const fmoe::moe::DispatchPlan plan = fmoe::moe::make_dispatch_plan(chosen, experts);
  const at::Tensor y = fmoe::moe::grouped_swiglu(fmoe::moe::permute_tokens(x_ref, plan), w13_ref, w2_ref, plan.rows_per_expert);
  const at::Tensor ref = fmoe::moe::unpermute_and_combine(y, probs, plan);
  ref.square().sum().backward();
  EXPECT_LT(((out - ref).norm() / ref.norm()).item<double>(), 1e-5);
  EXPECT_LT(((xa.grad() - x_ref.grad()).norm() / x_ref.grad().norm()).item<double>(), 1e-5);
  if (n == 1) {  // the all-reduce over one rank returns this rank's gradient
    const at::Tensor expected = at::cat({w13_ref.grad().reshape({-1}), w2_ref.grad().reshape({-1})});
    EXPECT_LT(((bucket - expected).norm() / expected.norm()).item<double>(), 1e-5);
  }
}

}  // namespace
