// A caching allocator for CPU tensors. A training step allocates and frees the
// same large buffers every step (the head's logits and their gradient, expert
// buffers, activations); from the C library each would come back as fresh pages
// (blocks above malloc's mmap ceiling, or from a thread's arena, are unmapped
// on free), and the next step pays a page fault per 4 KiB to touch them again:
// about 16 ms per 64 MiB on two cores. This allocator keeps freed blocks of at
// least min_block bytes in size classes (an eighth of a power of two: at most
// 12.5% slack) and hands them out again; smaller blocks go to malloc as
// LibTorch's own allocator does. Freed blocks beyond max_cached bytes are
// returned. Thread-safe (one mutex; large blocks are few per step).
#pragma once

#include <c10/core/Allocator.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <vector>

namespace fmoe::parallel {

struct CpuAllocatorStats {
  int64_t hits = 0;          // large allocations served from the cache
  int64_t misses = 0;        // large allocations that went to the C library
  int64_t cached_bytes = 0;  // held free in the cache now
  int64_t live_bytes = 0;    // large blocks handed out and not yet freed
};

class CachingCpuAllocator final : public c10::Allocator {
 public:
  CachingCpuAllocator(size_t min_block, size_t max_cached);
  ~CachingCpuAllocator() override;

  c10::DataPtr allocate(size_t bytes) override;
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  CpuAllocatorStats stats() const;
  // Returns every cached block to the C library.
  void empty_cache();
  // The size class a request of `bytes` is rounded up to (for tests).
  static size_t size_class(size_t bytes);

 private:
  // The deleter of every block (small ones too): finds the block's allocator.
  static void release(void* ptr);
  void give_back(void* ptr, size_t size_class);

  const size_t min_block_;
  const size_t max_cached_;
  std::map<size_t, std::vector<void*>> free_;  // size class -> free blocks (guarded by the file's mutex)
  CpuAllocatorStats stats_;
};

// Installs one process-wide caching allocator as LibTorch's CPU allocator
// (once; later calls return the same). The test hook FMOE_CPU_ALLOCATOR_CACHE_MB
// sets its limit (default 4096; 0 leaves LibTorch's allocator in place and
// returns null). Throws what a malformed test hook throws.
CachingCpuAllocator* install_caching_cpu_allocator();

}  // namespace fmoe::parallel
