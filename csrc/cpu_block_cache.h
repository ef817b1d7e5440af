// A switchable cache of large CPU blocks (see cpu_block_cache.cpp); exposed as
// torch.ops.sficonv_ext.cpu_block_cache_* and wrapped by sficonv_ext.cpu_allocator.
#pragma once

#include <cstdint>
#include <vector>

namespace sficonv {

// Installs the cache over torch's default CPU allocator; blocks of at least min_bytes are
// reused.
void cpu_block_cache_on(int64_t min_bytes);
// Stops caching, frees the cached blocks and puts torch's default CPU allocator back.
void cpu_block_cache_off();
// [on, min_bytes, hits, misses, evictions, cached_bytes, live_bytes, peak_live_bytes]
std::vector<int64_t> cpu_block_cache_stats();

}  // namespace sficonv
