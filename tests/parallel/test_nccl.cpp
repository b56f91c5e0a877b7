// The NCCL backend against closed forms on CUDA tensors. Without a GPU (or with
// more ranks than GPUs: NCCL needs one GPU per rank) every test is skipped with
// a visible SKIPPED line; scripts/gpu_check.sh runs it on a GPU machine.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

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

}  // namespace
