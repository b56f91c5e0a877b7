// main() for the single-process GoogleTest binaries: GoogleTest's own, except
// that a run with skipped tests exits with the skip code (tests/skip_exit.h).
#include <gtest/gtest.h>

#include "tests/skip_exit.h"

int main(int argc, char** argv) {
  ::testing::InitGoogleTest(&argc, argv);
  return fmoe::testing::exit_code_after(RUN_ALL_TESTS());
}
