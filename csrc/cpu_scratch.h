// Large CPU scratch tensors kept for reuse across calls (see cpu_scratch.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace sficonv {

// An uninitialised tensor of `sizes` (contiguous) whose memory comes back to a small pool when
// the tensor dies, for temporaries whose sizes recur every call (the Winograd weight tiles).
// Only for tensors that do not outlive the call. Blocks under 1 MiB are plain at::empty
// tensors; larger ones come from the pool or, on a miss, from c10::alloc_cpu (kept by the
// pool once freed).
at::Tensor scratch_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// [cached_bytes (held for reuse), in_use_bytes (handed out, alive), hits, misses, evictions
// (cached blocks freed to make room)]; the counts cover requests of at least 1 MiB since the
// process started.
std::vector<int64_t> cpu_scratch_stats();
// Frees the blocks held for reuse now; returns the bytes freed.
int64_t cpu_scratch_trim();

}  // namespace sficonv
