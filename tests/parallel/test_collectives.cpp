// Every collective of the MPI backend against closed-form results, for each
// dtype it supports, at whatever rank count mpirun starts (CTest: 2, 4, 8).
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <chrono>
#include <thread>

#include "parallel/mesh.h"
#include "parallel/mpi/mpi_communicator.h"
#include "tests/parallel/mpi_test_env.h"
#include "tests/test_util.h"

namespace {

using namespace fmoe::parallel;
using fmoe::testing::world;

constexpr std::chrono::milliseconds kTimeout{60000};
const at::ScalarType kDtypes[] = {at::kFloat, at::kBFloat16, at::kLong, at::kDouble};

// Small integers: exact in every dtype, so closed forms compare exactly.
at::Tensor ramp(int64_t n, int64_t rank, at::ScalarType dtype) {
  return (at::arange(n, at::kLong) % 7 + rank + 1).to(dtype);
}

TEST(Collectives, AllReduceSumAvgMax) {
  const int64_t r = world().rank(), n = world().size();
  for (at::ScalarType dtype : kDtypes) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
      if (op == ReduceOp::kAvg && !at::isFloatingType(dtype)) continue;
      at::Tensor t = ramp(37, r, dtype);
      world().all_reduce(t, {op, kTimeout})->wait();
      const at::Tensor base = at::arange(37, at::kLong) % 7;
      at::Tensor expected;
      if (op == ReduceOp::kSum) expected = base * n + n * (n + 1) / 2;
      if (op == ReduceOp::kMax) expected = base + n;
      if (op == ReduceOp::kAvg) expected = base.to(at::kDouble) + (n + 1) / 2.0;
      EXPECT_TRUE(at::equal(t.to(at::kDouble), expected.to(at::kDouble))) << c10::toString(dtype) << " op " << static_cast<int>(op);
      EXPECT_EQ(t.scalar_type(), dtype);
    }
  }
}

TEST(Collectives, Bf16SumRoundsOncePerStep) {
  // 1 + 2^-8 is not representable in BF16 (8 bits of mantissa): the sum of n copies of
  // 2^-9 onto 1.0 stays exactly what widening to FP32 and rounding back gives.
  at::Tensor t = at::full({3}, world().rank() == 0 ? 1.0 : 0.25, at::kBFloat16);
  world().all_reduce(t, {ReduceOp::kSum, kTimeout})->wait();
  const double expected = at::full({1}, 1.0 + 0.25 * (world().size() - 1), at::kFloat).to(at::kBFloat16).item<double>();
  EXPECT_EQ(t[2].item<double>(), expected);
}

TEST(Collectives, BroadcastFromEveryRoot) {
  for (int root = 0; root < world().size(); ++root) {
    for (at::ScalarType dtype : kDtypes) {
      at::Tensor t = ramp(10, world().rank(), dtype);
      world().broadcast(t, {root, kTimeout})->wait();
      EXPECT_TRUE(at::equal(t, ramp(10, root, dtype))) << "root " << root;
    }
  }
}

TEST(Collectives, AllGatherIsRankMajor) {
  const int64_t n = world().size();
  for (at::ScalarType dtype : kDtypes) {
    const at::Tensor in = ramp(5, world().rank(), dtype);
    at::Tensor out = at::empty({n * 5}, in.options());
    world().all_gather(out, in, {kTimeout})->wait();
    for (int64_t r = 0; r < n; ++r) EXPECT_TRUE(at::equal(out.narrow(0, r * 5, 5), ramp(5, r, dtype)));
  }
}

TEST(Collectives, ReduceScatterGivesEachRankItsBlock) {
  const int64_t r = world().rank(), n = world().size();
  for (at::ScalarType dtype : kDtypes) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg, ReduceOp::kMax}) {
      if (op == ReduceOp::kAvg && !at::isFloatingType(dtype)) continue;
      // Block b of rank r holds b * 10 + r + (0..3).
      const at::Tensor in = (at::arange(n * 4, at::kLong).floor_divide(4) * 10 + at::arange(n * 4, at::kLong) % 4 + r).to(dtype);
      at::Tensor out = at::empty({4}, in.options());
      world().reduce_scatter(out, in, {op, kTimeout})->wait();
      const at::Tensor own = (r * 10 + at::arange(4, at::kLong)).to(at::kDouble);
      at::Tensor expected = own * n + n * (n - 1) / 2.0;                    // sum over ranks q of own + q
      if (op == ReduceOp::kMax) expected = own + (n - 1);
      if (op == ReduceOp::kAvg) expected = own + (n - 1) / 2.0;
      EXPECT_TRUE(at::equal(out.to(at::kDouble), expected)) << c10::toString(dtype) << " op " << static_cast<int>(op);
    }
  }
}

// Rows sent from src to dst: (src + 2 * dst) % 3 of them, zero for some pairs.
int64_t rows_between(int64_t src, int64_t dst) { return (src + 2 * dst) % 3; }

TEST(Collectives, AllToAllWithUnevenAndZeroSplits) {
  const int64_t r = world().rank(), n = world().size();
  for (at::ScalarType dtype : kDtypes) {
    std::vector<int64_t> in_splits, out_splits;
    std::vector<at::Tensor> pieces;
    for (int64_t dst = 0; dst < n; ++dst) {
      in_splits.push_back(rows_between(r, dst));
      out_splits.push_back(rows_between(dst, r));
      // Each row [src, dst, i] identifies itself.
      for (int64_t i = 0; i < in_splits.back(); ++i) pieces.push_back(at::tensor({r, dst, i}, at::kLong).view({1, 3}));
    }
    const at::Tensor in = (pieces.empty() ? at::empty({0, 3}, at::kLong) : at::cat(pieces)).to(dtype);
    int64_t total = 0;
    for (int64_t s : out_splits) total += s;
    at::Tensor out = at::full({total, 3}, -1, in.options());
    world().all_to_all(out, in, out_splits, in_splits, {kTimeout})->wait();
    int64_t row = 0;
    for (int64_t src = 0; src < n; ++src) {
      for (int64_t i = 0; i < out_splits[src]; ++i, ++row) {
        EXPECT_TRUE(at::equal(out[row].to(at::kLong), at::tensor({src, r, i}, at::kLong))) << "row " << row;
      }
    }
  }
}

TEST(Collectives, AllToAllEqualSplitsAndEmptyTensors) {
  const int64_t r = world().rank(), n = world().size();
  const at::Tensor in = (at::arange(n * 2, at::kLong) + 100 * r).to(at::kFloat).view({n * 2, 1});
  at::Tensor out = at::empty_like(in);
  world().all_to_all(out, in, {}, {}, {kTimeout})->wait();
  for (int64_t src = 0; src < n; ++src) {
    EXPECT_EQ(out[2 * src].item<float>(), static_cast<float>(100 * src + 2 * r));
    EXPECT_EQ(out[2 * src + 1].item<float>(), static_cast<float>(100 * src + 2 * r + 1));
  }
  // Nothing to exchange at all is still a valid (and matching) collective.
  at::Tensor none = at::empty({0, 4}, at::kBFloat16);
  at::Tensor none_out = at::empty({0, 4}, at::kBFloat16);
  world().all_to_all(none_out, none, std::vector<int64_t>(n, 0), std::vector<int64_t>(n, 0), {kTimeout})->wait();
  EXPECT_EQ(none_out.numel(), 0);
}

TEST(Collectives, AllToAllRejectsInconsistentSplits) {
  const int64_t n = world().size();
  at::Tensor in = at::zeros({3, 2});
  at::Tensor out = at::zeros({3, 2});
  fmoe::testing::expect_error_mentions(
      [&] { world().all_to_all(out, in, std::vector<int64_t>(n, 0), std::vector<int64_t>(n, 1), {kTimeout}); }, "splits sum to");
}

TEST(Collectives, SendRecvAroundARing) {
  const int r = world().rank(), n = world().size();
  for (at::ScalarType dtype : kDtypes) {
    const at::Tensor out = ramp(6, r, dtype);
    at::Tensor in = at::empty_like(out);
    auto receive = world().recv(in, (r + n - 1) % n, {3, kTimeout});
    auto send = world().send(out, (r + 1) % n, {3, kTimeout});
    send->wait();
    receive->wait();
    EXPECT_TRUE(at::equal(in, ramp(6, (r + n - 1) % n, dtype)));
  }
}

// One group sends to both neighbours and receives from both, with tags and
// with messages matched in issue order only (NCCL's rule): at two ranks both
// neighbours are one rank, so its two messages pair up by their order.
TEST(Collectives, SendRecvGroupBothWaysAroundARing) {
  const int r = world().rank(), n = world().size();
  const int next = (r + 1) % n, prev = (r + n - 1) % n;
  for (const bool issue_order : {false, true}) {
    set_mpi_issue_order_matching(issue_order);
    for (at::ScalarType dtype : kDtypes) {
      const at::Tensor forward = ramp(5, r, dtype), backward = ramp(3, 10 * r, dtype);
      at::Tensor from_prev = at::empty_like(forward), from_next = at::empty_like(backward);
      std::vector<P2POp> ops{{true, forward, next, 1}, {true, backward, prev, 2}, {false, from_prev, prev, 1}, {false, from_next, next, 2}};
      world().send_recv(ops, kTimeout)->wait();
      EXPECT_TRUE(at::equal(from_prev, ramp(5, prev, dtype))) << issue_order;
      EXPECT_TRUE(at::equal(from_next, ramp(3, 10 * next, dtype))) << issue_order;
    }
  }
  set_mpi_issue_order_matching(false);
  EXPECT_TRUE(world().send_recv({}, kTimeout)->is_completed());
}

// Under NCCL's rules a send completes only once its receive is posted, however
// small (MPI would send eagerly): rank 1 posts it only after rank 0 has looked.
TEST(Collectives, IssueOrderSendsCompleteOnlyOnceReceived) {
  set_mpi_issue_order_matching(true);
  const at::Tensor one = at::ones({1});
  at::Tensor into = at::zeros({1});
  if (world().rank() == 0) {
    auto work = world().send(one, 1, {0, kTimeout});
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_FALSE(work->is_completed());
    world().barrier();
    work->wait();
  } else {
    world().barrier();
    if (world().rank() == 1) world().recv(into, 0, {0, kTimeout})->wait();
  }
  set_mpi_issue_order_matching(false);
  if (world().rank() == 1) EXPECT_EQ(into.item<float>(), 1.0f);
}

// Two threads of every rank all-reduce at once on one laned group, each on its
// own lane: rank-dependent pauses make the threads' calls interleave
// differently on every rank, yet each lane's sums are its own.
TEST(Collectives, TwoLanesCommunicateAtOnceFromTwoThreads) {
  ASSERT_TRUE(mpi_thread_multiple()) << "MPI was initialised without MPI_THREAD_MULTIPLE";
  const Mesh mesh = Mesh(std::shared_ptr<Communicator>(world().split(0, world().rank())), MeshShape{world().size(), 1, 1, 1}).with_second_lane();
  const int64_t r = world().rank(), n = world().size();
  const auto reduce = [&](int lane, float base, std::vector<float>& sums) {
    const CommLane on(lane);
    EXPECT_EQ(current_comm_lane(), lane);
    for (int i = 0; i < 20; ++i) {
      if ((i + r + lane) % 3 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      at::Tensor t = at::full({1000}, base * static_cast<float>(r + 1) + static_cast<float>(i));
      mesh.dp().all_reduce(t, {ReduceOp::kSum, kTimeout})->wait();
      sums.push_back(t[999].item<float>());
    }
  };
  std::vector<float> first, second;
  std::thread other([&] { reduce(1, 1000.0f, second); });
  reduce(0, 1.0f, first);
  other.join();
  EXPECT_EQ(current_comm_lane(), 0);
  ASSERT_EQ(first.size(), 20u);
  ASSERT_EQ(second.size(), 20u);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(first[static_cast<size_t>(i)], static_cast<float>(n * (n + 1) / 2 + n * i)) << i;
    EXPECT_EQ(second[static_cast<size_t>(i)], static_cast<float>(1000 * n * (n + 1) / 2 + n * i)) << i;
  }
}

TEST(Collectives, UnsupportedDtypeIsRefusedByName) {
  at::Tensor t = at::zeros({2}, at::kHalf);
  fmoe::testing::expect_error_mentions([&] { world().all_reduce(t, {ReduceOp::kSum, kTimeout}); }, "mpi backend: unsupported dtype Half");
  at::Tensor i = at::zeros({2}, at::kLong);
  fmoe::testing::expect_error_mentions([&] { world().all_reduce(i, {ReduceOp::kAvg, kTimeout}); }, "average of integer dtype");
}

TEST(Collectives, AMissingPeerTimesOutNamingTheRank) {
  // Rank 0 enters an all-reduce the others join only later: its wait must give up
  // within the timeout with a one-line error naming itself, not hang.
  auto group = world().split(0, world().rank());
  at::Tensor t = at::ones({4});
  if (world().rank() == 0) {
    auto work = group->all_reduce(t, {ReduceOp::kSum, std::chrono::milliseconds(300)});
    const auto start = std::chrono::steady_clock::now();
    fmoe::testing::expect_error_mentions([&] { work->wait(); }, "rank 0: all_reduce did not complete within 300 ms");
    EXPECT_GE(std::chrono::steady_clock::now() - start, std::chrono::milliseconds(300));
    world().barrier();
    work->wait();  // the late peers arrive: it completes after all
  } else {
    world().barrier();
    group->all_reduce(t, {ReduceOp::kSum, kTimeout})->wait();
  }
  EXPECT_EQ(t[0].item<float>(), static_cast<float>(world().size()));
}

TEST(Collectives, TheProgressThreadCompletesWhatTheCallerNeverTests) {
  // With the progress thread on, is_completed() reads a flag and makes no MPI
  // call, so only the thread can complete this all-reduce: the caller sleeps.
  const bool was_on = mpi_progress_thread();
  ASSERT_TRUE(set_mpi_progress_thread(true)) << "MPI was initialised without MPI_THREAD_MULTIPLE";
  const int64_t n = world().size();
  at::Tensor t = at::full({1 << 16}, static_cast<float>(world().rank() + 1));
  auto work = world().all_reduce(t, {ReduceOp::kSum, kTimeout});
  const auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (!work->is_completed() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  EXPECT_TRUE(work->is_completed());
  work->wait();
  EXPECT_TRUE(at::all(t == static_cast<float>(n * (n + 1) / 2)).item<bool>());
  if (!was_on) set_mpi_progress_thread(false);
}

TEST(Mesh, GroupsMatchTheDocumentedRankOrder) {
  const int64_t n = world().size();
  std::vector<MeshShape> shapes = {{n, 1, 1, 1}, {n, 1, 1, n}, {1, 1, n, 1}};
  if (n % 2 == 0) shapes.push_back({n / 2, 1, 2, n / 2});
  if (n % 2 == 0 && n >= 4) shapes.push_back({n / 2, 2, 1, 1});
  if (n % 4 == 0) shapes.push_back({n / 2, 1, 2, 2});
  if (n == 8) shapes.push_back({4, 1, 2, 2});
  for (const MeshShape& shape : shapes) {
    const Mesh mesh(fmoe::testing::world_communicator(), shape);
    const MeshCoords c = coords_of(shape, world().rank());
    // Every group's members, gathered, are exactly the ranks the formula puts there.
    const auto check = [&](Communicator& group, auto same_group, int64_t expected_size, int64_t expected_rank, const char* name) {
      ASSERT_EQ(group.size(), expected_size) << name << " " << shape.describe();
      EXPECT_EQ(group.rank(), expected_rank) << name << " " << shape.describe();
      at::Tensor me = at::full({1}, static_cast<int64_t>(world().rank()), at::kLong);
      at::Tensor members = at::empty({group.size()}, at::kLong);
      group.all_gather(members, me, {kTimeout})->wait();
      for (int64_t i = 0; i < group.size(); ++i) {
        const int64_t other = members[i].item<int64_t>();
        EXPECT_TRUE(same_group(coords_of(shape, other))) << name << " " << shape.describe() << " member " << other;
        if (i > 0) EXPECT_GT(other, members[i - 1].item<int64_t>()) << name;
      }
    };
    check(mesh.tp(), [&](const MeshCoords& o) { return o.dp == c.dp && o.pp == c.pp; }, shape.tp, c.tp, "tp");
    check(mesh.dp(), [&](const MeshCoords& o) { return o.tp == c.tp && o.pp == c.pp; }, shape.dp, c.dp, "dp");
    check(mesh.pp(), [&](const MeshCoords& o) { return o.tp == c.tp && o.dp == c.dp; }, shape.pp, c.pp, "pp");
    check(mesh.ep(), [&](const MeshCoords& o) { return o.tp == c.tp && o.pp == c.pp && o.edp == c.edp; }, shape.ep, c.ep, "ep");
    check(mesh.edp(), [&](const MeshCoords& o) { return o.tp == c.tp && o.pp == c.pp && o.ep == c.ep; }, shape.edp(), c.edp, "edp");
  }
}

TEST(Mesh, InvalidShapesNameTheDegree) {
  const int64_t n = world().size();
  fmoe::testing::expect_error_mentions([&] { Mesh(fmoe::testing::world_communicator(), {n, 1, 1, 3 * n}); }, "parallel.ep: ");
  fmoe::testing::expect_error_mentions([&] { Mesh(fmoe::testing::world_communicator(), {n, 1, 2, 1}); }, "but the job has");
  fmoe::testing::expect_error_mentions([&] { Mesh(fmoe::testing::world_communicator(), {n, 0, 1, 1}); }, "parallel.pp: 0");
}

}  // namespace
