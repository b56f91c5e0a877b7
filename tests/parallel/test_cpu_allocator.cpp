// The caching CPU allocator (parallel/cpu_allocator.h): size classes, reuse of
// freed blocks within a class and up to twice the request, the cache's limit,
// and LibTorch's CPU tensors going through it once installed.
#include <gtest/gtest.h>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include "parallel/cpu_allocator.h"

namespace {

using fmoe::parallel::CachingCpuAllocator;

constexpr size_t kMiB = size_t{1} << 20;

TEST(CachingCpuAllocator, SizeClassesAreEighthsOfAPowerOfTwo) {
  EXPECT_EQ(CachingCpuAllocator::size_class(kMiB), kMiB);
  EXPECT_EQ(CachingCpuAllocator::size_class(kMiB + 1), kMiB + kMiB / 8);
  EXPECT_EQ(CachingCpuAllocator::size_class(3000000), 12 * (2 * kMiB / 8));  // 3,145,728
  EXPECT_EQ(CachingCpuAllocator::size_class(100), 128u);
  for (size_t bytes = kMiB; bytes < 64 * kMiB; bytes = bytes * 9 / 7 + 12345) {
    const size_t cls = CachingCpuAllocator::size_class(bytes);
    EXPECT_GE(cls, bytes);
    EXPECT_LE(static_cast<double>(cls), 1.125 * static_cast<double>(bytes)) << bytes;
    EXPECT_EQ(cls % 64, 0u) << bytes;
  }
}

TEST(CachingCpuAllocator, AFreedBlockServesTheNextRequestOfItsClass) {
  CachingCpuAllocator allocator(kMiB, 64 * kMiB);
  void* first = nullptr;
  {
    const c10::DataPtr a = allocator.allocate(3000000);
    first = a.get();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(first) % 64, 0u);
    EXPECT_EQ(allocator.stats().live_bytes, 3145728);
  }
  EXPECT_EQ(allocator.stats().cached_bytes, 3145728);
  EXPECT_EQ(allocator.stats().live_bytes, 0);
  const c10::DataPtr b = allocator.allocate(2900000);  // the same class
  EXPECT_EQ(b.get(), first);
  EXPECT_EQ(allocator.stats().hits, 1);
  EXPECT_EQ(allocator.stats().misses, 1);
  EXPECT_EQ(allocator.stats().cached_bytes, 0);
  // Below min_block: malloc, not counted.
  { const c10::DataPtr small = allocator.allocate(1000); }
  EXPECT_EQ(allocator.stats().hits + allocator.stats().misses, 2);
}

TEST(CachingCpuAllocator, ALargerCachedBlockServesUpToTwiceTheRequest) {
  CachingCpuAllocator allocator(kMiB, 64 * kMiB);
  void* four = allocator.allocate(4 * kMiB).get();  // freed at once: cached
  {
    const c10::DataPtr d = allocator.allocate(5 * kMiB / 2);  // class 2.5 MiB: 4 MiB is within twice that
    EXPECT_EQ(d.get(), four);
  }
  const c10::DataPtr small = allocator.allocate(3 * kMiB / 2);  // 4 MiB is more than twice 1.5 MiB
  EXPECT_NE(small.get(), four);
  EXPECT_EQ(allocator.stats().hits, 1);
  EXPECT_EQ(allocator.stats().misses, 2);
  EXPECT_EQ(allocator.stats().cached_bytes, static_cast<int64_t>(4 * kMiB));
}

TEST(CachingCpuAllocator, TheCacheKeepsNoMoreThanItsLimit) {
  CachingCpuAllocator allocator(kMiB, 8 * kMiB);
  {
    const c10::DataPtr a = allocator.allocate(6 * kMiB);
    const c10::DataPtr b = allocator.allocate(6 * kMiB);
    EXPECT_EQ(allocator.stats().live_bytes, static_cast<int64_t>(12 * kMiB));
  }
  // The second block freed would take the cache to 12 MiB: it went back to the C library.
  EXPECT_EQ(allocator.stats().cached_bytes, static_cast<int64_t>(6 * kMiB));
  allocator.empty_cache();
  EXPECT_EQ(allocator.stats().cached_bytes, 0);
  const c10::DataPtr c = allocator.allocate(6 * kMiB);
  EXPECT_EQ(allocator.stats().misses, 3);
}

TEST(CachingCpuAllocator, InstalledItServesLibTorchCpuTensors) {
  CachingCpuAllocator* installed = fmoe::parallel::install_caching_cpu_allocator();
  if (installed == nullptr) GTEST_SKIP() << "FMOE_CPU_ALLOCATOR_CACHE_MB=0 keeps LibTorch's allocator";
  EXPECT_EQ(fmoe::parallel::install_caching_cpu_allocator(), installed);  // once per process
  EXPECT_EQ(c10::GetCPUAllocator(), installed);
  const int64_t hits = installed->stats().hits;
  void* first = nullptr;
  {
    const at::Tensor a = at::ones({1 << 20});  // 4 MiB of FP32
    first = a.data_ptr();
  }
  const at::Tensor b = at::zeros({1 << 20});
  EXPECT_EQ(b.data_ptr(), first);
  EXPECT_EQ(installed->stats().hits, hits + 1);
  EXPECT_EQ(b.sum().item<float>(), 0.0f);  // a reused block holds what the new tensor wrote, not the old one's
  const at::Tensor c = at::arange(1000, at::kFloat);  // small: malloc
  EXPECT_EQ(c.sum().item<float>(), 499500.0f);
}

}  // namespace
