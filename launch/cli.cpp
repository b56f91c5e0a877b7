#include "launch/cli.h"

#include <c10/util/Exception.h>
#include <malloc.h>

#include "parallel/cpu_allocator.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

namespace fmoe::launch {

bool Args::has(const std::string& key) const {
  return std::any_of(options.begin(), options.end(), [&](const auto& o) { return o.first == key; });
}

std::string Args::get(const std::string& key, const std::string& fallback) const {
  for (auto it = options.rbegin(); it != options.rend(); ++it) {
    if (it->first == key) return it->second;
  }
  return fallback;
}

std::vector<std::string> Args::all(const std::string& key) const {
  std::vector<std::string> values;
  for (const auto& [k, v] : options) {
    if (k == key) values.push_back(v);
  }
  return values;
}

std::string error_message(const std::exception& error) {
  if (const auto* torch_error = dynamic_cast<const c10::Error*>(&error)) return torch_error->what_without_backtrace();
  return error.what();
}

void configure_allocator() {
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  try {
    parallel::install_caching_cpu_allocator();
  } catch (const std::exception& e) {  // a malformed test hook: one line naming it
    std::fprintf(stderr, "error: %s\n", e.what());
    std::exit(2);
  }
}

int check_usage(const Args& args, const char* usage, const std::vector<std::string>& required, bool positional_allowed) {
  if (args.has("help")) {
    std::fputs(usage, stdout);
    return 0;
  }
  const bool missing = std::any_of(required.begin(), required.end(), [&](const std::string& key) { return !args.has(key); });
  if (missing || (!positional_allowed && !args.positional.empty()) || (positional_allowed && args.positional.empty())) {
    std::fputs(usage, stderr);
    return 2;
  }
  return -1;
}

Args parse_args(int argc, char** argv, int first, const std::vector<std::string>& flags) {
  Args args;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      args.positional.push_back(arg);
      continue;
    }
    std::string key = arg.substr(2);
    std::string value;
    if (const size_t eq = key.find('='); eq != std::string::npos && key.rfind("set", 0) != 0) {
      value = key.substr(eq + 1);
      key = key.substr(0, eq);
    } else if (std::find(flags.begin(), flags.end(), key) == flags.end()) {
      if (i + 1 >= argc) throw std::invalid_argument("option --" + key + " needs a value");
      value = argv[++i];
    }
    args.options.emplace_back(key, value);
  }
  return args;
}

}  // namespace fmoe::launch
