// Reading raw text corpora into documents. The default corpus is GCIDE
// (dict-gcide: a dictd database, gzip/dictzip text plus a headword index);
// user text files are split into documents at blank lines.
#pragma once

#include <string>
#include <vector>

namespace fmoe::data {

// One dictionary entry per document, in file order, with whitespace collapsed
// to single spaces. Database-info entries ("00-database-*") are skipped.
std::vector<std::string> read_gcide(const std::string& dict_dz_path, const std::string& index_path);

// Paragraphs (blank-line separated) of a UTF-8 text file, whitespace collapsed.
std::vector<std::string> read_text_documents(const std::string& path);

// Decodes the base64 numbers of a dictd .index file ("A"=0 … "/"=63, most
// significant digit first). Throws on a character outside the alphabet.
uint64_t decode_dictd_number(const std::string& digits);

std::string collapse_whitespace(std::string_view text);

}  // namespace fmoe::data
