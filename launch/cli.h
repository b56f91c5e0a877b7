// Tiny argument helpers shared by the launch mains.
#pragma once

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

// flags: option names that take no value.
Args parse_args(int argc, char** argv, int first, const std::vector<std::string>& flags);

}  // namespace fmoe::launch
