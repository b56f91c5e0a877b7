// main() for the multi-rank GoogleTest binaries run under mpirun: MPI is set up
// once, only rank 0 prints the report, and every rank exits non-zero when any
// rank failed, so one failing rank fails the whole CTest test.
#define OMPI_SKIP_MPICXX 1
#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdlib>
#include <string>

#include "parallel/device_communicators.h"
#include "tests/parallel/mpi_test_env.h"

namespace fmoe::testing {
std::shared_ptr<parallel::Communicator>& world_communicator() {
  static std::shared_ptr<parallel::Communicator> world;
  return world;
}
}  // namespace fmoe::testing

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
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
  if (const char* staged = std::getenv("FMOE_TEST_HOST_STAGING"); staged && std::string(staged) == "1") {
    fmoe::testing::world_communicator() = fmoe::parallel::with_host_staging(fmoe::testing::world_communicator(), /*always=*/true);
  }
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  int any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (failed) std::fprintf(stderr, "rank %d: tests failed\n", rank);
  fmoe::testing::world_communicator().reset();
  MPI_Finalize();
  return any_failed;
}
