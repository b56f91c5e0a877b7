// Deterministic (seq_len + 1)-token windows for training and validation.
//
// Documents are split into train and validation by a hash of (split_seed,
// document id), so the held-out set does not move when the training seed does.
// The training documents form one token stream cut into non-overlapping windows;
// each epoch visits every window once in an order drawn from (seed, epoch). A
// window is a pure function of (seed, step, micro-batch, dp rank, row): the
// loader has no hidden state, so resuming at step k is exact.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "data/indexed_dataset.h"

namespace fmoe::data {

struct LoaderOptions {
  int64_t seq_len = 256;
  int64_t micro_batch_size = 16;   // rows per micro-batch per data-parallel rank
  int64_t num_micro_batches = 1;   // gradient-accumulation steps per optimizer step
  int64_t dp_size = 1;
  uint64_t seed = 1234;
  double val_fraction = 0.01;
  uint64_t split_seed = 20240521;
};

uint64_t splitmix64(uint64_t x);

// True when document doc_id belongs to the validation split.
bool is_validation_document(int64_t doc_id, uint64_t split_seed, double val_fraction);

// A permutation of [0, n) drawn from seed with an explicit Fisher-Yates (the
// standard library's shuffle is not portable across implementations).
std::vector<int64_t> seeded_permutation(int64_t n, uint64_t seed);

class TokenLoader {
 public:
  TokenLoader(std::shared_ptr<const IndexedDataset> dataset, LoaderOptions options);

  // [micro_batch_size, seq_len + 1] int64 tokens for this (step, micro, dp rank).
  at::Tensor train_batch(int64_t step, int64_t micro, int64_t dp_rank) const;
  // The index-th validation batch: windows taken in order, identical on every run.
  at::Tensor val_batch(int64_t index) const;
  // count validation windows from first on ([count, seq_len + 1]), in order,
  // wrapping around the held-out stream: a layout-independent validation set.
  at::Tensor val_windows(int64_t first, int64_t count) const;

  int64_t num_train_windows() const;
  int64_t num_val_windows() const;
  int64_t train_tokens() const { return train_.starts.back(); }
  int64_t val_tokens() const { return val_.starts.back(); }
  const LoaderOptions& options() const { return options_; }

 private:
  struct Stream {
    std::vector<int64_t> doc_ids;
    std::vector<int64_t> starts;  // prefix sums of document lengths, size docs + 1
  };
  void copy_window(const Stream& stream, int64_t window, int64_t* out) const;

  std::shared_ptr<const IndexedDataset> dataset_;
  LoaderOptions options_;
  Stream train_;
  Stream val_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> cached_order_;
};

}  // namespace fmoe::data
