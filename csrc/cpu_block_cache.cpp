// A switchable cache of large CPU blocks, installed as c10's CPU allocator while it is on.
//
// Why: glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
// unmaps it on free, so a training step that allocates and frees the same large activations
// faults every page of them in again, 4 KiB at a time. SFIConv-ResNet's fused activations are
// exactly 32 MiB at batch 8, 256x256: on the 2-core test CPU the fast model's train step took
// 0.70 s with glibc's defaults against 0.46 s once those blocks were reused. Unlike glibc's
// process-wide mallopt switches, this cache can be turned off again, and turning it off frees
// what it holds.
//
// While on, a request of at least `min_bytes` is served from a freed block of the same size
// class (sizes are rounded up by at most 1/16) or, failing that, by c10::alloc_cpu; its
// DataPtr's deleter returns the block to the cache. Smaller requests go to the allocator that
// was installed before. Blocks freed while the cache is off go back to the system.
//
// Safety with ATen's raw_allocate/raw_deallocate (oneDNN allocates through them, and
// raw_deallocate uses whichever allocator is current when the block is freed): every block
// handed out is exactly what c10::alloc_cpu returned, so c10::free_cpu may free it, and the raw
// deleter never caches (it cannot know a block's size for sure), it only frees.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "cpu_block_cache.h"

namespace sficonv {
namespace {

// Sizes are rounded up to a multiple of 1/16 of their power of two (at least 64 KiB), so one
// freed block serves requests that differ by a few percent.
size_t size_class(size_t n) {
  size_t power = 1;
  while (power <= n / 2) power <<= 1;
  const size_t step = std::max<size_t>(power / 16, size_t(64) << 10);
  return (n + step - 1) / step * step;
}

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    size_t bytes = 0;
    void* block = nullptr;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (!on_ || n < min_bytes_ || previous_ == nullptr) {
        c10::Allocator* fallback = previous_ ? previous_ : c10::GetDefaultCPUAllocator();
        return fallback->allocate(n);
      }
      bytes = size_class(n);
      auto found = free_.find(bytes);
      if (found != free_.end() && !found->second.empty()) {
        block = found->second.back();
        found->second.pop_back();
        cached_bytes_ -= bytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (block == nullptr) block = c10::alloc_cpu(bytes);  // throws when out of memory
    {
      std::lock_guard<std::mutex> guard(mutex_);
      live_[block] = bytes;
      live_bytes_ += bytes;
    }
    return {block, block, &return_block, c10::Device(c10::DeviceType::CPU)};
  }

  // Used by raw_deallocate, which may be handed any CPU block: free it, never cache it.
  c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  void turn_on(int64_t min_bytes) {
    TORCH_CHECK(min_bytes >= 0, "min_bytes must be >= 0, got ", min_bytes);
    std::lock_guard<std::mutex> guard(mutex_);
    TORCH_CHECK(!on_, "the CPU block cache is already on");
    c10::Allocator* current = c10::GetCPUAllocator();
    if (current != this) {
      c10::SetCPUAllocator(this, /*priority=*/0);
      TORCH_CHECK(c10::GetCPUAllocator() == this,
                  "could not install the CPU block cache: another CPU allocator was set with a "
                  "higher priority");
      previous_ = current;
    }
    min_bytes_ = static_cast<size_t>(min_bytes);
    on_ = true;
  }

  // Stops caching, frees every cached block and puts the previous allocator back (if this one
  // is still the installed one). Blocks still in use are freed when their tensors go.
  void turn_off() {
    std::vector<void*> release;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (!on_) return;
      on_ = false;
      for (auto& entry : free_) {
        release.insert(release.end(), entry.second.begin(), entry.second.end());
      }
      free_.clear();
      cached_bytes_ = 0;
      if (c10::GetCPUAllocator() == this && previous_ != nullptr) {
        c10::SetCPUAllocator(previous_, /*priority=*/0);
        previous_ = nullptr;
      }
    }
    for (void* block : release) c10::free_cpu(block);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {on_ ? 1 : 0, static_cast<int64_t>(min_bytes_), static_cast<int64_t>(hits_),
            static_cast<int64_t>(misses_), static_cast<int64_t>(cached_bytes_),
            static_cast<int64_t>(live_bytes_)};
  }

 private:
  static void return_block(void* block);
  static void free_block(void* block);

  std::mutex mutex_;
  bool on_ = false;
  size_t min_bytes_ = 0;
  c10::Allocator* previous_ = nullptr;
  std::map<size_t, std::vector<void*>> free_;  // size class -> freed blocks
  std::unordered_map<void*, size_t> live_;     // blocks handed out -> size class
  size_t cached_bytes_ = 0, live_bytes_ = 0;
  uint64_t hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors may outlive every static destructor.
BlockCache& cache() {
  static BlockCache* instance = new BlockCache();
  return *instance;
}

void BlockCache::return_block(void* block) {
  BlockCache& self = cache();
  {
    std::lock_guard<std::mutex> guard(self.mutex_);
    auto found = self.live_.find(block);
    if (found != self.live_.end()) {
      const size_t bytes = found->second;
      self.live_.erase(found);
      self.live_bytes_ -= bytes;
      if (self.on_) {
        self.free_[bytes].push_back(block);
        self.cached_bytes_ += bytes;
        return;
      }
    }
  }
  c10::free_cpu(block);
}

void BlockCache::free_block(void* block) {
  BlockCache& self = cache();
  {
    std::lock_guard<std::mutex> guard(self.mutex_);
    auto found = self.live_.find(block);
    if (found != self.live_.end()) {
      self.live_bytes_ -= found->second;
      self.live_.erase(found);
    }
  }
  c10::free_cpu(block);
}

}  // namespace

void cpu_block_cache_on(int64_t min_bytes) { cache().turn_on(min_bytes); }

void cpu_block_cache_off() { cache().turn_off(); }

std::vector<int64_t> cpu_block_cache_stats() { return cache().stats(); }

}  // namespace sficonv
