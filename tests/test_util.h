// Helpers shared by the unit tests.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>

namespace fmoe::testing {

// fn must throw; its message must contain needle and be a single line.
inline void expect_error_mentions(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    FAIL() << "expected an error mentioning " << needle;
  } catch (const std::exception& e) {
    const std::string message = e.what();
    EXPECT_NE(message.find(needle), std::string::npos) << message;
    EXPECT_EQ(message.find('\n'), std::string::npos) << "error must be one line: " << message;
  }
}

}  // namespace fmoe::testing
