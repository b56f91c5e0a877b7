// How a GoogleTest binary tells CTest that it did not really run: a binary in
// which any test was skipped (GTEST_SKIP: no GPU, one GPU per rank missing) and
// none failed exits with kSkipExitCode, which every test's SKIP_RETURN_CODE
// maps to "skipped" in CTest's summary. A pass means everything ran.
#pragma once

#include <gtest/gtest.h>

#include <cstdio>

namespace fmoe::testing {

inline constexpr int kSkipExitCode = 77;

// The exit code for RUN_ALL_TESTS()'s result, printing one line when tests were skipped.
inline int exit_code_after(int run_all_tests_result, bool print = true) {
  const ::testing::UnitTest& unit = *::testing::UnitTest::GetInstance();
  if (run_all_tests_result != 0) return 1;
  if (unit.skipped_test_count() == 0) return 0;
  if (print) {
    std::printf("SKIPPED: %d of %d tests did not run (reasons above); exit %d marks this test skipped\n",
                unit.skipped_test_count(), unit.test_to_run_count(), kSkipExitCode);
    std::fflush(stdout);
  }
  return kSkipExitCode;
}

}  // namespace fmoe::testing
