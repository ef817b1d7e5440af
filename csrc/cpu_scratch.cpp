// A pool of large CPU scratch blocks, reused across calls.
//
// Why: glibc hands out blocks over its mmap threshold (at most 32 MiB) as fresh mappings and
// unmaps them when freed, so a temporary of that size is page-faulted in again on every call.
// The Winograd weight tiles of the fast model's 512-channel layers are 37.7 MB ([36, 512, 512]
// float32), made twice per train step per layer (forward, and the turned kernel in backward),
// with a tile-domain weight gradient of the same size: under glibc's defaults a profile of the
// train step put 18% of its page faults in writing those tiles. Kept here, they are faulted
// in once. Sizes recur exactly (the same layers every step), so blocks are matched by size.
// At most kMaxCachedBytes wait for reuse: to make room, the blocks that have waited longest
// are freed first (sizes no longer asked for, e.g. an evaluation's, leave that way).
//
// A fork() while another thread holds the lock would deadlock the child's first Winograd call;
// the library's forked children (data loader workers) run no convolutions.
#include "cpu_scratch.h"
#include "error_text.h"

#include <ATen/ATen.h>
#include <c10/core/impl/alloc_cpu.h>

#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sficonv {
namespace {

constexpr int64_t kMinBytes = int64_t{1} << 20;
constexpr int64_t kMaxCachedBytes = int64_t{256} << 20;
constexpr int64_t kAlignment = 64;

struct Block {
  void* data;
  int64_t bytes;
};

class ScratchPool {
 public:
  // A block of exactly `bytes`, reused if one of that size waits (the most recent).
  void* take(int64_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = cached_.rbegin(); it != cached_.rend(); ++it) {
        if (it->bytes != bytes) continue;
        void* data = it->data;
        cached_.erase(std::next(it).base());
        cached_bytes_ -= bytes;
        in_use_[data] = bytes;
        in_use_bytes_ += bytes;
        ++hits_;
        return data;
      }
      ++misses_;
    }
    void* data = c10::alloc_cpu(static_cast<size_t>(bytes));  // 64-byte aligned; throws OOM
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_[data] = bytes;
    in_use_bytes_ += bytes;
    return data;
  }

  // Back to the pool, after freeing the longest-waiting blocks if it would overflow; a block
  // larger than the whole pool goes straight back to the system. (A tensor's deleter: it must
  // not throw, so a block the pool never handed out is left alone.)
  void give_back(void* data) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = in_use_.find(data);
      if (found == in_use_.end()) return;
      const int64_t bytes = found->second;
      in_use_.erase(found);
      in_use_bytes_ -= bytes;
      if (bytes > kMaxCachedBytes) {
        to_free.push_back(data);
      } else {
        while (cached_bytes_ + bytes > kMaxCachedBytes) {
          to_free.push_back(cached_.front().data);
          cached_bytes_ -= cached_.front().bytes;
          cached_.pop_front();
          ++evictions_;
        }
        cached_.push_back({data, bytes});
        cached_bytes_ += bytes;
      }
    }
    for (void* block : to_free) c10::free_cpu(block);
  }

  int64_t trim() {
    std::list<Block> blocks;
    int64_t freed = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(cached_);
      freed = cached_bytes_;
      cached_bytes_ = 0;
    }
    for (const auto& block : blocks) c10::free_cpu(block.data);
    return freed;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, in_use_bytes_, hits_, misses_, evictions_};
  }

 private:
  std::mutex mutex_;
  std::list<Block> cached_;                    // waiting for reuse, longest-waiting first
  std::unordered_map<void*, int64_t> in_use_;  // handed out: block -> its bytes
  int64_t cached_bytes_ = 0, in_use_bytes_ = 0, hits_ = 0, misses_ = 0, evictions_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still give their blocks back.
ScratchPool& pool() {
  static ScratchPool* instance = new ScratchPool();
  return *instance;
}

}  // namespace

at::Tensor scratch_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  SFI_CHECK(options.device().is_cpu(), "scratch_empty: CPU tensors only");
  int64_t numel = 1;
  for (const auto size : sizes) numel *= size;
  const int64_t bytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (bytes < kMinBytes) return at::empty(sizes, options);
  const int64_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
  void* data = pool().take(rounded);
  try {
    return at::from_blob(data, sizes, [](void* p) { pool().give_back(p); }, options);
  } catch (...) {
    pool().give_back(data);
    throw;
  }
}

std::vector<int64_t> cpu_scratch_stats() { return pool().stats(); }

int64_t cpu_scratch_trim() { return pool().trim(); }

}  // namespace sficonv
