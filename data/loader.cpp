#include "data/loader.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <stdexcept>
#include <string>

namespace fmoe::data {

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

bool is_validation_document(int64_t doc_id, uint64_t split_seed, double val_fraction) {
  const uint64_t h = splitmix64(split_seed ^ splitmix64(static_cast<uint64_t>(doc_id)));
  const double u = static_cast<double>(h >> 11) * 0x1.0p-53;
  return u < val_fraction;
}

std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  uint64_t state = seed;
  for (int64_t i = n - 1; i > 0; --i) {
    state = splitmix64(state);
    // Lemire's multiply-shift gives j in [0, i] with negligible bias for our sizes.
    const auto j = static_cast<int64_t>((static_cast<unsigned __int128>(state) * static_cast<uint64_t>(i + 1)) >> 64);
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  return order;
}

TokenLoader::TokenLoader(std::shared_ptr<const IndexedDataset> dataset, LoaderOptions options)
    : dataset_(std::move(dataset)), options_(options) {
  train_.starts.push_back(0);
  val_.starts.push_back(0);
  for (int64_t doc = 0; doc < dataset_->num_documents(); ++doc) {
    Stream& stream = is_validation_document(doc, options_.split_seed, options_.val_fraction) ? val_ : train_;
    stream.doc_ids.push_back(doc);
    stream.starts.push_back(stream.starts.back() + dataset_->document_length(doc));
  }
  const std::string& name = dataset_->prefix();
  if (num_train_windows() < 1) {
    throw std::runtime_error(name + ": too few training tokens (" + std::to_string(train_tokens()) +
                             ") for one window of seq_len + 1 = " + std::to_string(options_.seq_len + 1));
  }
  if (options_.val_fraction > 0 && num_val_windows() < options_.micro_batch_size) {
    throw std::runtime_error(name + ": validation split holds " + std::to_string(num_val_windows()) +
                             " windows, fewer than one micro-batch; raise data.val_fraction");
  }
}

int64_t TokenLoader::num_train_windows() const { return (train_tokens() - 1) / options_.seq_len; }
int64_t TokenLoader::num_val_windows() const { return std::max<int64_t>(0, (val_tokens() - 1) / options_.seq_len); }

void TokenLoader::copy_window(const Stream& stream, int64_t window, int64_t* out) const {
  int64_t position = window * options_.seq_len;
  int64_t remaining = options_.seq_len + 1;
  // The document holding `position`, then forward across document boundaries.
  size_t doc = static_cast<size_t>(std::upper_bound(stream.starts.begin(), stream.starts.end(), position) - stream.starts.begin() - 1);
  while (remaining > 0) {
    const int64_t offset = position - stream.starts[doc];
    const int64_t take = std::min(remaining, stream.starts[doc + 1] - position);
    dataset_->copy_tokens(stream.doc_ids[doc], offset, take, out);
    out += take;
    position += take;
    remaining -= take;
    ++doc;
  }
}

at::Tensor TokenLoader::train_batch(int64_t step, int64_t micro, int64_t dp_rank) const {
  const int64_t rows = options_.micro_batch_size;
  at::Tensor batch = at::empty({rows, options_.seq_len + 1}, at::kLong);
  const int64_t windows = num_train_windows();
  const int64_t first = ((step * options_.num_micro_batches + micro) * options_.dp_size + dp_rank) * rows;
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t sample = first + row;
    const int64_t epoch = sample / windows;
    if (epoch != cached_epoch_) {
      cached_order_ = seeded_permutation(windows, splitmix64(options_.seed) ^ static_cast<uint64_t>(epoch));
      cached_epoch_ = epoch;
    }
    copy_window(train_, cached_order_[static_cast<size_t>(sample % windows)], batch[row].data_ptr<int64_t>());
  }
  return batch;
}

at::Tensor TokenLoader::val_batch(int64_t index) const { return val_windows(index * options_.micro_batch_size, options_.micro_batch_size); }

at::Tensor TokenLoader::val_windows(int64_t first, int64_t count) const {
  at::Tensor batch = at::empty({count, options_.seq_len + 1}, at::kLong);
  const int64_t windows = num_val_windows();
  for (int64_t row = 0; row < count; ++row) copy_window(val_, (first + row) % windows, batch[row].data_ptr<int64_t>());
  return batch;
}

}  // namespace fmoe::data
