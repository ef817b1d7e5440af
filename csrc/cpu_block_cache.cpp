// A switchable cache of large CPU blocks, installed as c10's CPU allocator while it is on.
//
// Why: glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh mmap and
// unmaps it on free, so a training step that allocates and frees the same large activations
// faults every page of them in again, 4 KiB at a time. SFIConv-ResNet's fused activations are
// exactly 32 MiB at batch 8, 256x256: on the 2-core test CPU the fast model's train step took
// 0.69 s with glibc's defaults against 0.44 s with this cache. Unlike glibc's process-wide
// mallopt switches, it can be turned off again, and turning it off frees what it holds.
//
// While on (process-wide: every thread), a request of at least `min_bytes` is served from a
// freed block of its size class (sizes rounded up by at most 1/16) or else by c10::alloc_cpu;
// its DataPtr's deleter returns the block to the cache. The cache holds at most what keeps
// (in use + cached) within a budget times the largest amount ever in use at once (2 by
// default, set when turned on): a miss that would go beyond that first frees the blocks cached
// longest ago, and a failed allocation frees them all and tries again. Twice, not once, for
// training: a step's blocks are cached between their uses in different size classes, and a
// once-the-peak budget evicted and page-faulted 15,000-23,000 pages a step back in (0.46 s a
// step against 0.44 s for the fast model at batch 8, 256x256). In inference, where few
// activations live at a time, a lower budget trades speed for memory (README). A trim frees
// every cached block on request. Smaller requests go to torch's default CPU allocator.
//
// Only installed over torch's default CPU allocator, whose blocks are c10::alloc_cpu's and
// whose raw deleter frees with c10::free_cpu (after telling the profiler): ATen's
// raw_deallocate (oneDNN allocates through raw_allocate) frees a block with whichever
// allocator is current at that moment, so every block either allocator hands out must be
// freeable by the other's raw deleter. Ours caches only blocks it handed out since it was last
// turned on (their sizes are known: turning on and off forget every block, and a block made
// while it goes off is not recorded, so none can be stale) and passes any other to torch's.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <pthread.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "cpu_block_cache.h"
#include "error_text.h"

namespace sficonv {
namespace {

// Rounded up to a multiple of 1/16 of the size's power of two (64 bytes at least), so one
// freed block serves requests that differ by a few percent.
size_t size_class(size_t n) {
  size_t power = 1;
  while (power <= n / 2) power <<= 1;
  const size_t step = std::max<size_t>(power / 16, 64);
  return (n + step - 1) / step * step;
}

const c10::Device kCpu(c10::DeviceType::CPU);

class BlockCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    bool serve = false;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      serve = on_ && n >= min_bytes_ && n > 0;
    }
    // The default allocator, called without our lock held.
    if (!serve) return c10::GetDefaultCPUAllocator()->allocate(n);
    const size_t bytes = size_class(n);
    void* block = take_cached(bytes);
    if (block == nullptr) block = fresh_block(bytes);
    size_t live = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (!on_) {
        // Turned off since the check above: recorded now, the block would outlive the
        // session's bookkeeping (turning off forgets every block). It is alloc_cpu's own.
        return {block, block, &c10::free_cpu, kCpu};
      }
      live_[block] = bytes;
      live_bytes_ += bytes;
      peak_live_bytes_ = std::max(peak_live_bytes_, live_bytes_);
      live = live_bytes_;
      reserved = live_bytes_ + cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(block, static_cast<int64_t>(bytes), live, reserved, kCpu);
    return {block, block, &return_block, kCpu};
  }

  // raw_deallocate may hand it any CPU block: see raw_return.
  c10::DeleterFnPtr raw_deleter() const override { return &raw_return; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Opening the first block turns the cache on; others only join. Blocks are named by the
  // caller's token, and opening or closing one twice does nothing: the Python side may then
  // close its block whether or not a KeyboardInterrupt stopped it before or after the open
  // reached here, and retry a close the interrupt may have cut short, without ever closing
  // another block (which a plain count could not tell apart).
  void enter_block(int64_t token, int64_t min_bytes, double budget) {
    SFI_CHECK(min_bytes >= 0, "min_bytes must be >= 0, got ", min_bytes);
    SFI_CHECK(budget >= 1.0 && budget <= 64.0, "budget must be in [1, 64], got ", budget);
    std::lock_guard<std::mutex> guard(mutex_);
    if (open_.count(token)) return;
    if (open_.empty()) turn_on_locked(min_bytes, budget);
    open_.insert(token);
  }

  // Closing the last open block stops caching, frees every cached block and puts torch's
  // default allocator back (if this one is still the installed one). Blocks still in use are
  // freed when their tensors go, and are forgotten here, so their raw frees elsewhere leave
  // nothing stale. A token not open (closed already, never opened, or a forked child closing
  // its parent's) does nothing.
  void leave_block(int64_t token) {
    std::vector<void*> release;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      if (open_.erase(token) == 0 || !open_.empty()) return;
      release = switch_off_locked();
    }
    for (void* block : release) c10::free_cpu(block);
  }

  // Frees every cached (not in use) block; returns how many bytes. For callers that know the
  // sizes they allocate are about to change (an evaluation moving to another image size).
  int64_t trim() {
    std::vector<void*> release;
    size_t freed = 0;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      freed = cached_bytes_;
      release = evict_locked(0, /*everything=*/true);
    }
    for (void* block : release) c10::free_cpu(block);
    return static_cast<int64_t>(freed);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> guard(mutex_);
    return {on_ ? 1 : 0,
            static_cast<int64_t>(min_bytes_),
            static_cast<int64_t>(hits_),
            static_cast<int64_t>(misses_),
            static_cast<int64_t>(evictions_),
            static_cast<int64_t>(cached_bytes_),
            static_cast<int64_t>(live_bytes_),
            static_cast<int64_t>(peak_live_bytes_)};
  }

  // fork(): the child must not inherit a locked mutex (another thread may hold it while one
  // thread forks), and a worker process (a DataLoader's) starts with the cache off.
  void before_fork() { mutex_.lock(); }
  void after_fork_in_parent() { mutex_.unlock(); }
  void after_fork_in_child() {
    std::vector<void*> release;
    if (on_) release = switch_off_locked();
    open_.clear();
    mutex_.unlock();
    for (void* block : release) c10::free_cpu(block);
  }

 private:
  struct Cached {
    void* block;
    uint64_t when;  // order of caching, for freeing the oldest first
  };

  static bool take_back(void* block);
  static void return_block(void* block);
  static void raw_return(void* block);

  void turn_on_locked(int64_t min_bytes, double budget) {
    SFI_CHECK(!on_, "the CPU block cache is already on");
    c10::Allocator* current = c10::GetCPUAllocator();
    SFI_CHECK(current == this || current == c10::GetDefaultCPUAllocator(),
              "the CPU block cache only replaces torch's default CPU allocator, and another "
              "one is installed");
    if (current != this) {
      c10::SetCPUAllocator(this, /*priority=*/0);
      SFI_CHECK(c10::GetCPUAllocator() == this,
                "could not install the CPU block cache: another CPU allocator was set with a "
                "higher priority");
    }
    min_bytes_ = static_cast<size_t>(min_bytes);
    budget_ = budget;
    hits_ = misses_ = evictions_ = 0;
    live_.clear();
    live_bytes_ = peak_live_bytes_ = 0;
    on_ = true;
  }

  std::vector<void*> switch_off_locked() {
    on_ = false;
    std::vector<void*> release;
    for (auto& entry : free_) {
      for (const Cached& cached : entry.second) release.push_back(cached.block);
    }
    free_.clear();
    live_.clear();
    cached_bytes_ = live_bytes_ = 0;
    if (c10::GetCPUAllocator() == this) {
      c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), /*priority=*/0);
    }
    return release;
  }

  void* take_cached(size_t bytes) {
    std::lock_guard<std::mutex> guard(mutex_);
    auto found = free_.find(bytes);
    if (found == free_.end() || found->second.empty()) {
      ++misses_;
      return nullptr;
    }
    void* block = found->second.back().block;
    found->second.pop_back();
    if (found->second.empty()) free_.erase(found);
    cached_bytes_ -= bytes;
    ++hits_;
    return block;
  }

  // The blocks cached longest ago, until (in use + cached + `incoming`) fits within `budget_`
  // times the largest amount ever in use, or all of them (`everything`).
  std::vector<void*> evict_locked(size_t incoming, bool everything) {
    std::vector<void*> release;
    // The peak counts the incoming block: measured against the peak before it, a new peak
    // evicted every cached block (the bound became live + incoming).
    const size_t peak = std::max(peak_live_bytes_, live_bytes_ + incoming);
    const size_t budget = static_cast<size_t>(budget_ * peak);
    while (!free_.empty() && (everything || live_bytes_ + cached_bytes_ + incoming > budget)) {
      auto oldest = free_.begin();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second.front().when < oldest->second.front().when) oldest = it;
      }
      std::vector<Cached>& blocks = oldest->second;
      release.push_back(blocks.front().block);
      blocks.erase(blocks.begin());
      cached_bytes_ -= oldest->first;
      ++evictions_;
      if (blocks.empty()) free_.erase(oldest);
    }
    return release;
  }

  void* fresh_block(size_t bytes) {
    std::vector<void*> release;
    {
      std::lock_guard<std::mutex> guard(mutex_);
      release = evict_locked(bytes, /*everything=*/false);
    }
    for (void* block : release) c10::free_cpu(block);
    try {
      return c10::alloc_cpu(bytes);
    } catch (const c10::Error&) {
      // Out of memory (alloc_cpu throws): give back everything cached, then try once more.
      {
        std::lock_guard<std::mutex> guard(mutex_);
        release = evict_locked(bytes, /*everything=*/true);
      }
      if (release.empty()) throw;
      for (void* block : release) c10::free_cpu(block);
      return c10::alloc_cpu(bytes);
    }
  }

  std::mutex mutex_;
  bool on_ = false;
  std::unordered_set<int64_t> open_;  // the tokens of the open blocks
  size_t min_bytes_ = 0;
  double budget_ = 2.0;  // in use + cached stays within budget_ x the peak in use
  std::map<size_t, std::vector<Cached>> free_;  // size class -> freed blocks, oldest first
  std::unordered_map<void*, size_t> live_;      // blocks handed out while on -> size class
  size_t cached_bytes_ = 0, live_bytes_ = 0, peak_live_bytes_ = 0;
  uint64_t hits_ = 0, misses_ = 0, evictions_ = 0, clock_ = 0;
};

// Never destroyed: tensors may outlive every static destructor.
BlockCache& cache() {
  static BlockCache* instance = [] {
    auto* made = new BlockCache();
    pthread_atfork([] { cache().before_fork(); }, [] { cache().after_fork_in_parent(); },
                   [] { cache().after_fork_in_child(); });
    return made;
  }();
  return *instance;
}

// A block handed out since the cache was last turned on goes back to the cache (or is freed,
// if the cache is off now); returns false for any other block, which it leaves alone.
bool BlockCache::take_back(void* block) {
  BlockCache& self = cache();
  size_t live = 0, reserved = 0, bytes = 0;
  bool keep = false;
  {
    std::lock_guard<std::mutex> guard(self.mutex_);
    auto found = self.live_.find(block);
    if (found == self.live_.end()) return false;
    bytes = found->second;
    self.live_.erase(found);
    self.live_bytes_ -= bytes;
    keep = self.on_;
    if (keep) {
      self.free_[bytes].push_back({block, self.clock_++});
      self.cached_bytes_ += bytes;
    }
    live = self.live_bytes_;
    reserved = self.live_bytes_ + self.cached_bytes_;
  }
  c10::reportMemoryUsageToProfiler(block, -static_cast<int64_t>(bytes), live, reserved, kCpu);
  if (!keep) c10::free_cpu(block);
  return true;
}

// The deleter of the DataPtrs the cache hands out. A block from before the cache was last
// turned off is no longer known, and is alloc_cpu's own: freed.
void BlockCache::return_block(void* block) {
  if (!take_back(block)) c10::free_cpu(block);
}

// The raw deleter (ATen's raw_deallocate, with any CPU block): a block from torch's default
// allocator goes to that allocator's own raw deleter, which also tells the profiler.
void BlockCache::raw_return(void* block) {
  if (!take_back(block)) c10::GetDefaultCPUAllocator()->raw_deleter()(block);
}

}  // namespace

void cpu_block_cache_enter(int64_t token, int64_t min_bytes, double budget) {
  cache().enter_block(token, min_bytes, budget);
}

void cpu_block_cache_exit(int64_t token) { cache().leave_block(token); }

int64_t cpu_block_cache_trim() { return cache().trim(); }

std::vector<int64_t> cpu_block_cache_stats() { return cache().stats(); }

}  // namespace sficonv
