// A switchable cache of large CPU blocks (see cpu_block_cache.cpp); exposed as
// torch.ops.sficonv_ext.cpu_block_cache_* and wrapped by sficonv_ext.cpu_allocator.
#pragma once

#include <cstdint>
#include <vector>

namespace sficonv {

// Opens the block named by the caller's token: the first open one installs the cache over
// torch's default CPU allocator (blocks of at least min_bytes are reused; in use + cached stays
// within budget x the peak in use); others only join. Opening an open token does nothing.
void cpu_block_cache_enter(int64_t token, int64_t min_bytes, double budget);
// Closes a block: the last open one stops caching, frees the cached blocks and puts torch's
// default CPU allocator back. Does nothing for a token that is not open.
void cpu_block_cache_exit(int64_t token);
// Frees every cached block now (the cache stays on); returns the bytes freed.
int64_t cpu_block_cache_trim();
// [on, min_bytes, hits, misses, evictions, cached_bytes, live_bytes, peak_live_bytes]
std::vector<int64_t> cpu_block_cache_stats();

}  // namespace sficonv
