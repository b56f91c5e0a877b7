#include "common/file_util.h"

#include <fcntl.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <stdexcept>

namespace fmoe::common {

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return bytes;
}

uint32_t crc32_update(uint32_t crc, const void* bytes, size_t size) {
  const char* data = static_cast<const char*>(bytes);
  uLong value = crc;
  // zlib takes uInt lengths: feed in 1 GiB pieces.
  size_t done = 0;
  while (done < size) {
    const size_t piece = std::min<size_t>(size - done, size_t{1} << 30);
    value = ::crc32(value, reinterpret_cast<const Bytef*>(data + done), static_cast<uInt>(piece));
    done += piece;
  }
  return static_cast<uint32_t>(value);
}

uint32_t crc32_of(std::string_view bytes) { return crc32_update(0, bytes.data(), bytes.size()); }

uint32_t crc32_of_file(const std::string& path) { return crc32_of(read_file(path)); }

AtomicFileWriter::AtomicFileWriter(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd_ < 0) throw std::runtime_error(tmp_ + ": cannot create: " + std::strerror(errno));
}

AtomicFileWriter::~AtomicFileWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void AtomicFileWriter::append(const void* data, size_t size) {
  const char* bytes = static_cast<const char*>(data);
  crc_ = crc32_update(crc_, bytes, size);
  size_t done = 0;
  while (done < size) {
    const ssize_t n = ::write(fd_, bytes + done, size - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(tmp_ + ": write failed: " + std::strerror(errno));
    }
    done += static_cast<size_t>(n);
  }
}

uint32_t AtomicFileWriter::commit() {
  const int fd = fd_;
  fd_ = -1;
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    const std::string why = std::strerror(errno);
    ::unlink(tmp_.c_str());
    throw std::runtime_error(tmp_ + ": fsync/close failed: " + why);
  }
  std::error_code ec;
  std::filesystem::rename(tmp_, path_, ec);
  if (ec) throw std::runtime_error(path_ + ": cannot rename from " + tmp_ + ": " + ec.message());
  fsync_directory(std::filesystem::path(path_).parent_path().string());
  return crc_;
}

void write_file_atomic(const std::string& path, std::string_view bytes) {
  AtomicFileWriter writer(path);
  writer.append(bytes);
  writer.commit();
}

void fsync_directory(const std::string& dir) {
  const int fd = ::open(dir.empty() ? "." : dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return;  // best effort: some filesystems refuse directory fds
  ::fsync(fd);
  ::close(fd);
}

}  // namespace fmoe::common
