#include "data/corpus.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "common/file_util.h"

namespace fmoe::data {

using common::read_file;
namespace {

std::string gunzip_file(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (!file) throw std::runtime_error(path + ": cannot open: " + std::strerror(errno));
  std::string out;
  std::string chunk(1 << 20, '\0');
  while (true) {
    const int n = gzread(file, chunk.data(), static_cast<unsigned>(chunk.size()));
    if (n < 0) {
      int code = 0;
      const std::string why = gzerror(file, &code);
      gzclose(file);
      throw std::runtime_error(path + ": corrupt gzip/dictzip data: " + why);
    }
    if (n == 0) break;
    out.append(chunk.data(), static_cast<size_t>(n));
  }
  const int rc = gzclose(file);
  if (rc != Z_OK) throw std::runtime_error(path + ": truncated or corrupt gzip/dictzip data");
  return out;
}

}  // namespace

uint64_t decode_dictd_number(const std::string& digits) {
  static const std::string kAlphabet =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  uint64_t value = 0;
  for (char c : digits) {
    const size_t digit = kAlphabet.find(c);
    if (digit == std::string::npos) throw std::runtime_error("bad dictd base64 digit '" + std::string(1, c) + "'");
    value = value * 64 + digit;
  }
  return value;
}

std::string collapse_whitespace(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  bool pending_space = false;
  for (char c : text) {
    if (c == ' ' || c == '\n' || c == '\t' || c == '\r') {
      pending_space = !out.empty();
    } else {
      if (pending_space) out.push_back(' ');
      pending_space = false;
      out.push_back(c);
    }
  }
  return out;
}

std::vector<std::string> read_gcide(const std::string& dict_dz_path, const std::string& index_path) {
  const std::string text = gunzip_file(dict_dz_path);
  std::ifstream index(index_path);
  if (!index) throw std::runtime_error(index_path + ": cannot open: " + std::strerror(errno));

  // Several headwords can point at one entry: keep each (offset, length) once.
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  std::string line;
  size_t line_number = 0;
  while (std::getline(index, line)) {
    ++line_number;
    const size_t tab1 = line.find('\t');
    const size_t tab2 = tab1 == std::string::npos ? tab1 : line.find('\t', tab1 + 1);
    if (tab2 == std::string::npos) {
      throw std::runtime_error(index_path + ":" + std::to_string(line_number) + ": expected 'headword<TAB>offset<TAB>length'");
    }
    if (line.rfind("00-", 0) == 0) continue;
    uint64_t offset, length;
    try {
      offset = decode_dictd_number(line.substr(tab1 + 1, tab2 - tab1 - 1));
      length = decode_dictd_number(line.substr(tab2 + 1));
    } catch (const std::exception& e) {
      throw std::runtime_error(index_path + ":" + std::to_string(line_number) + ": " + e.what());
    }
    if (offset + length > text.size()) {
      throw std::runtime_error(index_path + ":" + std::to_string(line_number) + ": entry points past the end of " + dict_dz_path);
    }
    spans.emplace_back(offset, length);
  }
  std::sort(spans.begin(), spans.end());
  spans.erase(std::unique(spans.begin(), spans.end()), spans.end());

  std::vector<std::string> documents;
  documents.reserve(spans.size());
  for (const auto& [offset, length] : spans) {
    std::string doc = collapse_whitespace(std::string_view(text).substr(offset, length));
    if (!doc.empty()) documents.push_back(std::move(doc));
  }
  if (documents.empty()) throw std::runtime_error(index_path + ": no documents found");
  return documents;
}

std::vector<std::string> read_text_documents(const std::string& path) {
  const std::string text = read_file(path);
  std::vector<std::string> documents;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find("\n\n", start);
    if (end == std::string::npos) end = text.size();
    std::string doc = collapse_whitespace(std::string_view(text).substr(start, end - start));
    if (!doc.empty()) documents.push_back(std::move(doc));
    start = end + 2;
  }
  return documents;
}

}  // namespace fmoe::data
