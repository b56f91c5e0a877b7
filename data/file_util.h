// Small file helpers shared by the data tools: whole-file reads, CRC32 and
// atomic writes. Every failure throws std::runtime_error naming the file.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace fmoe::data {

std::string read_file(const std::string& path);
uint32_t crc32_of(std::string_view bytes);
uint32_t crc32_of_file(const std::string& path);
// Writes to path + ".tmp", fsyncs, then renames over path.
void write_file_atomic(const std::string& path, std::string_view bytes);
// fsyncs a directory so that a rename inside it is durable.
void fsync_directory(const std::string& dir);

}  // namespace fmoe::data
