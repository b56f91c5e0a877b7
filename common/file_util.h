// Small file helpers shared by the data tools: whole-file reads, CRC32 and
// atomic writes. Every failure throws std::runtime_error naming the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace fmoe::common {

std::string read_file(const std::string& path);
uint32_t crc32_of(std::string_view bytes);
// Continues a CRC32 (start from 0) over more bytes.
uint32_t crc32_update(uint32_t crc, const void* data, size_t size);
uint32_t crc32_of_file(const std::string& path);
// Writes to path + ".tmp", fsyncs, then renames over path.
void write_file_atomic(const std::string& path, std::string_view bytes);

// The streaming form of write_file_atomic: bytes are appended piecewise (a CRC32
// kept on the way), and only commit() makes the file appear at path. Destroyed
// uncommitted, it removes the temporary file.
class AtomicFileWriter {
 public:
  explicit AtomicFileWriter(std::string path);
  ~AtomicFileWriter();
  AtomicFileWriter(const AtomicFileWriter&) = delete;
  AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
  void append(const void* data, size_t size);
  void append(std::string_view bytes) { append(bytes.data(), bytes.size()); }
  // fsync, rename over path, fsync the directory; returns the CRC32 of everything written.
  uint32_t commit();
  uint32_t crc32() const { return crc_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  uint32_t crc_ = 0;
};
// fsyncs a directory so that a rename inside it is durable.
void fsync_directory(const std::string& dir);

}  // namespace fmoe::common
