// Tiny argument helpers shared by the launch mains.
#pragma once

#include <exception>
#include <string>
#include <vector>

namespace fmoe::launch {

struct Args {
  std::vector<std::string> positional;
  std::vector<std::pair<std::string, std::string>> options;  // --key value / --flag ""
  bool has(const std::string& key) const;
  std::string get(const std::string& key, const std::string& fallback = "") const;
  std::vector<std::string> all(const std::string& key) const;
};

// Keeps freed memory in the process: the training step allocates and frees the
// same large activations every step, and returning them to the kernel costs a
// page fault per 4 KiB on the next step. Blocks of 1 MiB and more go through
// the caching CPU allocator (parallel/cpu_allocator.h), the rest through malloc
// with its trimming off. A malformed test hook (docs/test-hooks.md) exits 2 with
// one line naming it.
void configure_allocator();

// The one-line message of an error: LibTorch's errors without their backtrace.
std::string error_message(const std::exception& error);

// flags: option names that take no value.
Args parse_args(int argc, char** argv, int first, const std::vector<std::string>& flags);

// --help prints usage to stdout (exit 0); a missing required option or a stray
// positional argument prints it to stderr (exit 2). Returns the exit code, or
// -1 when the arguments are usable.
int check_usage(const Args& args, const char* usage, const std::vector<std::string>& required, bool positional_allowed = false);

}  // namespace fmoe::launch
