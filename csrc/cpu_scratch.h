// Large CPU blocks kept for reuse across calls: kernel temporaries and outputs (see
// cpu_scratch.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace sficonv {

// An uninitialised tensor of `sizes` (contiguous) whose memory comes back to the pool when
// the tensor dies, for temporaries whose sizes recur every call (the Winograd weight tiles).
// Only for tensors that do not outlive the call. Blocks under 1 MiB are plain at::empty
// tensors; larger ones come from the pool or, on a miss, from c10::alloc_cpu (kept by the
// pool once freed).
at::Tensor scratch_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// An uninitialised tensor of `sizes` in `format` for a kernel's output, which may outlive the
// call: blocks of 31 MiB or more (those glibc would map afresh) come from the pool and go back
// to it when the last tensor using them dies; smaller ones from the current CPU allocator.
at::Tensor output_empty(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format);

// [cached_bytes (held for reuse), in_use_bytes (handed out, alive), hits, misses, evictions
// (cached blocks freed to make room), peak_in_use_bytes]; the counts cover the requests served
// by the pool since the process started.
std::vector<int64_t> cpu_scratch_stats();
// Frees the blocks held for reuse now and restarts the high-water mark that sets the cap;
// returns the bytes freed.
int64_t cpu_scratch_trim();

}  // namespace sficonv
