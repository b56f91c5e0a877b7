#include "parallel/cpu_allocator.h"

#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include "common/test_hooks.h"

#include <bit>
#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#include <utility>

namespace fmoe::parallel {
namespace {

constexpr size_t kAlignment = 64;  // LibTorch's CPU alignment (AVX-512 lines)

// One lock for every instance: a large block's owner and class, and the free
// lists. Large blocks are a few hundred per step, small ones never take it.
std::mutex& registry_mutex() {
  static auto* mutex = new std::mutex();  // outlives every tensor, as the registry does
  return *mutex;
}
std::unordered_map<void*, std::pair<CachingCpuAllocator*, size_t>>& registry() {
  static auto* blocks = new std::unordered_map<void*, std::pair<CachingCpuAllocator*, size_t>>();  // outlives every tensor
  return *blocks;
}

void* aligned(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, kAlignment, bytes == 0 ? kAlignment : bytes) != 0) p = nullptr;
  return p;
}

void free_small(void* ptr) { std::free(ptr); }

}  // namespace

CachingCpuAllocator::CachingCpuAllocator(size_t min_block, size_t max_cached) : min_block_(min_block), max_cached_(max_cached) {}

CachingCpuAllocator::~CachingCpuAllocator() { empty_cache(); }

size_t CachingCpuAllocator::size_class(size_t bytes) {
  if (bytes <= 8 * kAlignment) return (bytes + kAlignment - 1) / kAlignment * kAlignment;
  const size_t step = std::bit_floor(bytes) / 8;  // eight classes per power of two
  return (bytes + step - 1) / step * step;
}

c10::DataPtr CachingCpuAllocator::allocate(size_t bytes) {
  if (bytes < min_block_) {
    void* p = aligned(bytes);
    TORCH_CHECK(p != nullptr, "CPU allocator: out of memory allocating ", bytes, " bytes");
    return {p, p, &free_small, c10::Device(c10::kCPU)};
  }
  const size_t cls = size_class(bytes);
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    // The request's class, else the smallest cached block up to twice its size
    // (expert buffers change size from step to step).
    for (auto it = free_.lower_bound(cls); it != free_.end() && it->first <= 2 * cls; ++it) {
      if (it->second.empty()) continue;
      void* p = it->second.back();
      it->second.pop_back();
      stats_.cached_bytes -= static_cast<int64_t>(it->first);
      stats_.live_bytes += static_cast<int64_t>(it->first);
      ++stats_.hits;
      return {p, p, &release, c10::Device(c10::kCPU)};
    }
  }
  void* p = aligned(cls);
  if (p == nullptr) {  // give the cache back and try once more before failing
    empty_cache();
    p = aligned(cls);
  }
  TORCH_CHECK(p != nullptr, "CPU allocator: out of memory allocating ", bytes, " bytes");
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[p] = {this, cls};
  stats_.live_bytes += static_cast<int64_t>(cls);
  ++stats_.misses;
  return {p, p, &release, c10::Device(c10::kCPU)};
}

void CachingCpuAllocator::release(void* ptr) {
  if (ptr == nullptr) return;
  CachingCpuAllocator* owner = nullptr;
  size_t cls = 0;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    const auto it = registry().find(ptr);
    if (it != registry().end()) std::tie(owner, cls) = it->second;
  }
  if (owner == nullptr) {
    std::free(ptr);  // a small block handed out through raw_allocate
    return;
  }
  owner->give_back(ptr, cls);
}

void CachingCpuAllocator::give_back(void* ptr, size_t cls) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  stats_.live_bytes -= static_cast<int64_t>(cls);
  if (stats_.cached_bytes + static_cast<int64_t>(cls) > static_cast<int64_t>(max_cached_)) {
    registry().erase(ptr);
    std::free(ptr);
    return;
  }
  free_[cls].push_back(ptr);
  stats_.cached_bytes += static_cast<int64_t>(cls);
}

CpuAllocatorStats CachingCpuAllocator::stats() const {
  std::lock_guard<std::mutex> lock(registry_mutex());
  return stats_;
}

void CachingCpuAllocator::empty_cache() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  for (auto& [cls, blocks] : free_) {
    for (void* p : blocks) {
      registry().erase(p);
      std::free(p);
    }
  }
  free_.clear();
  stats_.cached_bytes = 0;
}

CachingCpuAllocator* install_caching_cpu_allocator() {
  static CachingCpuAllocator* installed = []() -> CachingCpuAllocator* {
    const int64_t limit_mb = common::test_hooks().cpu_allocator_cache_mb;
    if (limit_mb == 0) return nullptr;
    // Never destroyed: tensors that outlive main() still return their blocks to it.
    auto* allocator = new CachingCpuAllocator(/*min_block=*/1 << 20, static_cast<size_t>(limit_mb) << 20);
    c10::SetCPUAllocator(allocator, /*priority=*/1);
    return allocator;
  }();
  return installed;
}

}  // namespace fmoe::parallel
