// Collective bandwidth of the MPI backend, reported as nccl-tests does:
//   algbw = bytes / time;  busbw = algbw x (all_reduce: 2(n-1)/n, all_to_all /
//   reduce_scatter / all_gather: (n-1)/n); bytes: the per-rank buffer (all_reduce,
//   all_to_all), the full input (reduce_scatter) or the full output (all_gather).
// Run under mpirun; rank 0 prints one row per (op, size).
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <thread>

#include "parallel/communicator.h"
#include "parallel/mpi/mpi_communicator.h"

int main(int argc, char** argv) {
  fmoe::parallel::MpiRuntime mpi(&argc, &argv);
  auto world = fmoe::parallel::make_mpi_world_communicator();
  const int n = world->size();
  if (world->rank() == 0) {
    std::printf("MPI backend, %d ranks, FP32\n%-15s %12s %10s %12s %12s\n", n, "op", "bytes", "time(us)", "algbw(GB/s)", "busbw(GB/s)");
  }
  using namespace fmoe::parallel;
  for (int64_t bytes = 1 << 10; bytes <= (int64_t{64} << 20); bytes *= 8) {
    const int64_t elems = bytes / 4 / n * n;
    at::Tensor buffer = at::ones({elems});
    at::Tensor gathered = at::empty({elems});
    at::Tensor piece = at::empty({elems / n});
    at::Tensor out = at::empty({elems});
    const std::vector<std::pair<std::string, std::function<void()>>> ops = {
        {"all_reduce", [&] { world->all_reduce(buffer, {ReduceOp::kSum})->wait(); }},
        {"all_to_all", [&] { world->all_to_all(out, buffer, {}, {}, {})->wait(); }},
        {"reduce_scatter", [&] { world->reduce_scatter(piece, buffer, {ReduceOp::kSum})->wait(); }},
        {"all_gather", [&] { world->all_gather(gathered, buffer.narrow(0, 0, elems / n), {})->wait(); }},
    };
    for (const auto& [name, run] : ops) {
      const int iterations = bytes >= (8 << 20) ? 5 : 20;
      run();  // warm-up
      world->barrier();
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < iterations; ++i) run();
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iterations;
      const double algbw = static_cast<double>(elems * 4) / seconds / 1e9;
      const double factor = name == "all_reduce" ? 2.0 * (n - 1) / n : static_cast<double>(n - 1) / n;
      if (world->rank() == 0) {
        std::printf("%-15s %12lld %10.1f %12.3f %12.3f\n", name.c_str(), static_cast<long long>(elems * 4), seconds * 1e6, algbw,
                    algbw * factor);
      }
    }
  }
  // What a blocking collective costs beyond its transfer when ranks compute in
  // between: every rank alternates the same compute (FP32 GEMMs, ~5 ms on one
  // core) with a 1 KiB all-reduce, on the threads moe-train gives it (cores /
  // ranks). Against the same loop without the all-reduces (every rank still
  // computing at once), the difference per all-reduce is what a rank loses at
  // each synchronisation: partners that are behind, or, with more ranks than
  // cores, descheduled (cluster specs' collective_latency_us and
  // oversubscribed_latency_us).
  {
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    at::set_num_threads(std::max(1, cores / n));
    const at::Tensor a = at::randn({256, 256});
    at::Tensor reps = at::zeros({1});
    if (world->rank() == 0) {
      at::mm(a, a);  // warm-up
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < 10; ++i) at::mm(a, a);
      const double one = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / 10;
      reps.fill_(std::max(1.0, std::round(5e-3 * std::max(1, cores / n) / one)));
    }
    world->broadcast(reps, {0})->wait();
    const int per_iteration = static_cast<int>(reps.item<float>());
    at::Tensor small = at::ones({256});
    const int iterations = 100;
    const auto loop = [&](bool sync) {
      world->barrier();
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < iterations; ++i) {
        for (int r = 0; r < per_iteration; ++r) at::mm(a, a);
        if (sync) world->all_reduce(small, {ReduceOp::kSum})->wait();
      }
      at::Tensor seconds = at::full({1}, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(), at::kDouble);
      world->all_reduce(seconds, {ReduceOp::kMax})->wait();  // the slowest rank's loop
      return seconds.item<double>() / iterations;
    };
    const double alone = loop(false), synced = loop(true);
    if (world->rank() == 0) {
      std::printf("sync between computes: %d ranks x %d threads on %d cores, %.2f ms of GEMMs a step, +%.0f us a step with a 1 KiB "
                  "all_reduce after each (%s)\n",
                  n, std::max(1, cores / n), cores, alone * 1e3, (synced - alone) * 1e6,
                  n > cores ? "oversubscribed_latency_us" : "collective_latency_us");
    }
  }
  world.reset();
  return 0;
}
