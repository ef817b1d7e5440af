// A pool of large CPU scratch blocks, reused across calls.
//
// Why: glibc hands out blocks over its mmap threshold (at most 32 MiB) as fresh mappings and
// unmaps them when freed, so a temporary of that size is page-faulted in again on every call.
// The Winograd weight tiles of the fast model's 512-channel layers are 37.7 MB ([36, 512, 512]
// float32), made twice per train step per layer (forward, and the turned kernel in backward),
// with a tile-domain weight gradient of the same size: under glibc's defaults a profile of the
// train step put 18% of its page faults in writing those tiles. Kept here, they are faulted
// in once. Sizes recur exactly (the same layers every step), so blocks are matched by size.
// At most kMaxCachedBytes wait for reuse; beyond that freed blocks go back to the system.
#include "cpu_scratch.h"

#include <ATen/ATen.h>

#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace sficonv {
namespace {

constexpr int64_t kMinBytes = int64_t{1} << 20;
constexpr int64_t kMaxCachedBytes = int64_t{256} << 20;
constexpr size_t kAlignment = 64;

class ScratchPool {
 public:
  // A block of exactly `bytes` (a multiple of kAlignment), reused if one is free.
  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = free_.find(bytes);
      if (found != free_.end() && !found->second.empty()) {
        void* block = found->second.back();
        found->second.pop_back();
        cached_bytes_ -= bytes;
        hand_out(block, bytes);
        ++hits_;
        return block;
      }
      ++misses_;
    }
    void* block = std::aligned_alloc(kAlignment, static_cast<size_t>(bytes));
    TORCH_CHECK(block != nullptr, "sficonv_ext scratch: out of memory allocating ", bytes,
                " bytes");
    std::lock_guard<std::mutex> lock(mutex_);
    hand_out(block, bytes);
    return block;
  }

  // Back to the pool, or to the system when the pool is full. (A tensor's deleter: must not
  // throw, so a block the pool never handed out is left alone.)
  void give_back(void* block) {
    std::unique_lock<std::mutex> lock(mutex_);
    auto found = in_use_.find(block);
    if (found == in_use_.end()) return;
    const int64_t bytes = found->second;
    in_use_.erase(found);
    in_use_bytes_ -= bytes;
    if (cached_bytes_ + bytes <= kMaxCachedBytes) {
      free_[bytes].push_back(block);
      cached_bytes_ += bytes;
      return;
    }
    lock.unlock();
    std::free(block);
  }

  int64_t trim() {
    std::vector<void*> blocks;
    int64_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& entry : free_) {
        blocks.insert(blocks.end(), entry.second.begin(), entry.second.end());
      }
      free_.clear();
      freed = cached_bytes_;
      cached_bytes_ = 0;
    }
    for (void* block : blocks) std::free(block);
    return freed;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, in_use_bytes_, hits_, misses_};
  }

 private:
  void hand_out(void* block, int64_t bytes) {  // with the lock held
    in_use_[block] = bytes;
    in_use_bytes_ += bytes;
  }

  std::mutex mutex_;
  std::unordered_map<int64_t, std::vector<void*>> free_;  // bytes -> free blocks of that size
  std::unordered_map<void*, int64_t> in_use_;             // block -> its bytes
  int64_t cached_bytes_ = 0, in_use_bytes_ = 0, hits_ = 0, misses_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still give their blocks back.
ScratchPool& pool() {
  static ScratchPool* instance = new ScratchPool();
  return *instance;
}

}  // namespace

at::Tensor scratch_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_CHECK(options.device().is_cpu(), "scratch_empty: CPU tensors only");
  int64_t numel = 1;
  for (const auto size : sizes) numel *= size;
  const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kMinBytes) return at::empty(sizes, options);
  const int64_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* block = pool().take(rounded);
  return at::from_blob(block, sizes, [](void* p) { pool().give_back(p); }, options);
}

std::vector<int64_t> cpu_scratch_stats() { return pool().stats(); }

int64_t cpu_scratch_trim() { return pool().trim(); }

}  // namespace sficonv
