// A pool of large CPU blocks, reused across calls: the Winograd kernels' temporaries, and the
// largest outputs of the BatchNorm epilogue and of the 3x3 (Winograd) and 1x1 (conv1x1_cpu.cpp)
// convolutions.
//
// Why: glibc hands out blocks over its mmap threshold (at most 32 MiB) as fresh mappings and
// unmaps them when freed, so a block of that size is page-faulted in again on every call.
// - The Winograd weight tiles of the fast model's 512-channel layers are 37.7 MB ([36, 512,
//   512] float32), made twice per train step per layer (forward, and the turned kernel in
//   backward), with a tile-domain weight gradient of the same size: under glibc's defaults a
//   profile of the train step put 18% of its page faults in writing those tiles.
// - The epilogue's outputs (y in forward, the input and residual gradients in backward) are
//   exactly 32 MiB for layer1 of SFIConv-ResNet at batch 8, 256x256: 39% of the page faults
//   of a 9-step training run were the epilogue writing its outputs, and on its own the
//   backward with a residual took 20.4 ms from fresh mappings against 7.7 ms from reused
//   blocks (2026-11-28, 2-core Xeon).
// - The 1x1 convolutions of layer1 write 32 MiB outputs and input gradients at that size:
//   oneDNN's convolution writing a fresh one took 18.8 ms, the matrix product into a reused
//   block 5.3 ms (conv1x1_cpu.cpp).
// Kept here, they are faulted in once. Sizes recur exactly (the same layers every step), so
// blocks are matched by size. Temporaries (scratch_empty) use the pool from 1 MiB; outputs
// (output_empty), which may live long, only from 31 MiB: blocks whose request (with glibc's
// alignment padding) passes 32 MiB are mapped afresh every time, while glibc's threshold rises
// to the size of any smaller mapping it frees, so those come back from its heap.
// Blocks waiting for reuse are capped at the larger of 256 MiB and twice the most the pool
// has had handed out at once: a training step's blocks are all freed by its end and the next
// step wants them all again, while blocks of one size wait as others are in use (a cap of
// once the peak missed and re-faulted 17 blocks a step at batch 16, twice the peak none). To
// make room, the blocks that have waited longest are freed first (sizes no longer asked for,
// e.g. an evaluation's, leave that way). cpu_scratch_trim frees them all and lowers the cap
// again (the high-water mark restarts from what is in use).
//
// Both kinds are served by a c10::Allocator the tensors keep (so they resize like any tensor),
// their blocks going back to the pool when the last tensor using them dies. An allocation
// that fails frees the waiting blocks and tries once more. fork() is safe: the lock is taken
// around it, so the child's copy is never left locked.
#include "cpu_scratch.h"
#include "error_text.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <algorithm>
#include <list>
#include <mutex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace sficonv {
namespace {

constexpr int64_t kMinBytes = int64_t{1} << 20;
constexpr int64_t kMinCachedCap = int64_t{256} << 20;
constexpr int64_t kOutputMinBytes = int64_t{31} << 20;
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
        note_in_use_locked(data, bytes);
        ++hits_;
        return data;
      }
      ++misses_;
    }
    void* data = nullptr;
    try {
      data = c10::alloc_cpu(static_cast<size_t>(bytes));  // 64-byte aligned; throws OOM
    } catch (const c10::Error&) {
      // The waiting blocks (of other sizes) may be what the allocation lacked.
      trim();
      data = c10::alloc_cpu(static_cast<size_t>(bytes));
    }
    std::lock_guard<std::mutex> lock(mutex_);
    note_in_use_locked(data, bytes);
    return data;
  }

  // Back to the pool, after freeing the longest-waiting blocks if it would overflow the cap
  // (which is at least twice any block in use, so the block itself always fits). A tensor's
  // deleter: it must not throw, so a block the pool never handed out is left alone.
  void give_back(void* data) {
    std::vector<void*> to_free;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto found = in_use_.find(data);
      if (found == in_use_.end()) return;
      const int64_t bytes = found->second;
      in_use_.erase(found);
      in_use_bytes_ -= bytes;
      const int64_t cap = std::max(kMinCachedCap, 2 * peak_in_use_bytes_);
      while (!cached_.empty() && cached_bytes_ + bytes > cap) {
        to_free.push_back(cached_.front().data);
        cached_bytes_ -= cached_.front().bytes;
        cached_.pop_front();
        ++evictions_;
      }
      cached_.push_back({data, bytes});
      cached_bytes_ += bytes;
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
      peak_in_use_bytes_ = in_use_bytes_;  // the cap falls back: the workload is done
    }
    for (const auto& block : blocks) c10::free_cpu(block.data);
    return freed;
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, in_use_bytes_, hits_, misses_, evictions_, peak_in_use_bytes_};
  }

  // fork(): the child must not inherit a locked mutex (another thread may hold it while one
  // thread forks); a child (a DataLoader worker) may free inherited pooled tensors.
  void before_fork() { mutex_.lock(); }
  void after_fork() { mutex_.unlock(); }

 private:
  void note_in_use_locked(void* data, int64_t bytes) {
    in_use_[data] = bytes;
    in_use_bytes_ += bytes;
    peak_in_use_bytes_ = std::max(peak_in_use_bytes_, in_use_bytes_);
  }

  std::mutex mutex_;
  std::list<Block> cached_;                    // waiting for reuse, longest-waiting first
  std::unordered_map<void*, int64_t> in_use_;  // handed out: block -> its bytes
  int64_t cached_bytes_ = 0, in_use_bytes_ = 0, peak_in_use_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0, evictions_ = 0;
};

// Never destroyed: tensors freed during interpreter shutdown still give their blocks back.
ScratchPool& pool() {
  static ScratchPool* instance = [] {
    auto* made = new ScratchPool();
    pthread_atfork([] { pool().before_fork(); }, [] { pool().after_fork(); },
                   [] { pool().after_fork(); });
    return made;
  }();
  return *instance;
}

void give_back_block(void* data) { pool().give_back(data); }

// Requests of at least `min_bytes` from the pool, others from the current CPU allocator. The
// tensors keep it as their storage's allocator, so a resize_ is served the same way.
class PoolAllocator final : public c10::Allocator {
 public:
  explicit PoolAllocator(int64_t min_bytes) : min_bytes_(min_bytes) {}

  c10::DataPtr allocate(size_t n) override {
    const auto bytes = static_cast<int64_t>(n);
    if (bytes < min_bytes_) return c10::GetCPUAllocator()->allocate(n);
    const int64_t rounded = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    void* data = pool().take(rounded);
    return {data, data, &give_back_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  const int64_t min_bytes_;
};

PoolAllocator& scratch_allocator() {
  static PoolAllocator* instance = new PoolAllocator(kMinBytes);
  return *instance;
}

PoolAllocator& output_allocator() {
  static PoolAllocator* instance = new PoolAllocator(kOutputMinBytes);
  return *instance;
}

at::Tensor pooled_empty(PoolAllocator& allocator, at::IntArrayRef sizes,
                        const at::TensorOptions& options, at::MemoryFormat format,
                        const char* caller) {
  SFI_CHECK(options.device().is_cpu(), caller, ": CPU tensors only");
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), format);
}

}  // namespace

at::Tensor scratch_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return pooled_empty(scratch_allocator(), sizes, options, at::MemoryFormat::Contiguous,
                      "scratch_empty");
}

at::Tensor output_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format) {
  return pooled_empty(output_allocator(), sizes, options, format, "output_empty");
}

std::vector<int64_t> cpu_scratch_stats() { return pool().stats(); }

int64_t cpu_scratch_trim() { return pool().trim(); }

}  // namespace sficonv
