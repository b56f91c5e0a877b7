// main() for the multi-rank GoogleTest binaries run under mpirun: MPI is set up
// once, only rank 0 prints the report, and every rank exits non-zero when any
// rank failed, so one failing rank fails the whole CTest test; when none failed
// and any rank skipped tests, every rank exits with the skip code (tests/skip_exit.h).
#define OMPI_SKIP_MPICXX 1
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <string>

#include "common/test_hooks.h"
#include "parallel/device_communicators.h"
#include "parallel/mpi/mpi_communicator.h"
#include "tests/parallel/mpi_test_env.h"
#include "tests/skip_exit.h"

namespace fmoe::testing {
std::shared_ptr<parallel::Communicator>& world_communicator() {
  static std::shared_ptr<parallel::Communicator> world;
  return world;
}
}  // namespace fmoe::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  fmoe::testing::world_communicator() = fmoe::parallel::make_mpi_world_communicator();
  // FMOE_TEST_HOST_STAGING=1: every collective goes through the host-staging
  // layer that moves CUDA tensors over MPI, here staging CPU tensors too.
  if (fmoe::common::test_hooks().test_host_staging) {
    fmoe::testing::world_communicator() = fmoe::parallel::with_host_staging(fmoe::testing::world_communicator(), /*always=*/true);
  }
  // FMOE_TEST_MPI_PROGRESS=1: the progress thread drives every request.
  if (fmoe::common::test_hooks().test_mpi_progress && !fmoe::parallel::set_mpi_progress_thread(true)) {
    std::fprintf(stderr, "rank %d: FMOE_TEST_MPI_PROGRESS=1 but MPI gives no MPI_THREAD_MULTIPLE (provided %d)\n", rank, provided);
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  // 0 passed, 1 skipped, 2 failed: the worst over the ranks decides.
  const int code = fmoe::testing::exit_code_after(RUN_ALL_TESTS(), /*print=*/false);
  const int mine = code == 0 ? 0 : code == fmoe::testing::kSkipExitCode ? 1 : 2;
  int worst = 0;
  MPI_Allreduce(&mine, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (mine == 2) std::fprintf(stderr, "rank %d: tests failed\n", rank);
  if (worst == 1 && rank == 0) {
    std::printf("SKIPPED: tests did not run on at least one rank (reasons above); exit %d marks this test skipped\n",
                fmoe::testing::kSkipExitCode);
  }
  fmoe::testing::world_communicator().reset();
  fmoe::parallel::set_mpi_progress_thread(false);
  MPI_Finalize();
  return worst == 2 ? 1 : worst == 1 ? fmoe::testing::kSkipExitCode : 0;
}
