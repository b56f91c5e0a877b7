// Shared by the multi-rank tests: the world communicator set up by mpi_test_main.cpp.
#pragma once

#include <memory>

#include "parallel/communicator.h"
#include "parallel/mpi/mpi_communicator.h"

namespace fmoe::testing {
std::shared_ptr<parallel::Communicator>& world_communicator();
inline parallel::Communicator& world() { return *world_communicator(); }
}  // namespace fmoe::testing
