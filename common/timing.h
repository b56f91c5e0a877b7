// Wall-clock timing on the monotonic clock: the one helper every timer uses.
#pragma once

#include <chrono>

namespace fmoe::common {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) { return std::chrono::duration<double>(Clock::now() - start).count(); }

}  // namespace fmoe::common
