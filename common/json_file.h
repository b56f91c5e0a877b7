// Reading the small JSON sidecars (dataset and tokenizer metadata, checkpoint
// state) with a one-line error naming the file when it is not JSON.
#pragma once

#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>

#include "common/file_util.h"

namespace fmoe::common {

// what names the file's role in the message, e.g. "dataset metadata".
inline nlohmann::json read_json_file(const std::string& path, const std::string& what) {
  try {
    return nlohmann::json::parse(read_file(path));
  } catch (const nlohmann::json::exception&) {
    throw std::runtime_error(path + ": corrupt " + what + " (not valid JSON)");
  }
}

}  // namespace fmoe::common
