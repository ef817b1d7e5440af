// Runs CUDA kernels as host C++, for the kernel tests only (CI has no GPU). Each block's threads
// are std::threads: __syncthreads is a barrier of the whole block, a warp shuffle a barrier of
// its 32 threads only (so warps are not kept in step where the GPU would not keep them). After
// every __syncthreads the first warp waits until every other thread has run ahead to its next
// __syncthreads (or finished): the most adverse schedule for the reductions here, which finish
// in the first warp. A barrier missing between that warp's reads of shared memory and the
// other warps' next writes then gives a wrong result every time. Blocks run one after another,
// so a kernel's __shared__ array (here a function-local static) is its block's. Dynamic shared
// memory is exactly the size asked for (the test builds with AddressSanitizer, which reports a
// write past it) and starts each block as NaN, so reading a value the block never wrote shows
// in the result. Not covered: races between blocks. (Half types run through c10's host-side
// BFloat16 and Half; see tile_kernels.cpp.)
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <climits>
#include <limits>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuda_host {
inline thread_local dim3 thread_index;
inline dim3 block_index, block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
inline std::vector<double> shuffle_slots;  // one per thread of the block
// Per thread of the block: how many __syncthreads it has arrived at (LONG_MAX once finished).
inline std::unique_ptr<std::atomic<long>[]> arrivals;
inline unsigned block_threads = 0;
inline thread_local long passed = 0;  // __syncthreads this thread has passed
inline std::vector<double> dynamic_shared;  // doubles: aligned for any kernel element type

inline int linear_thread() {
  return static_cast<int>(thread_index.y * block_dim.x + thread_index.x);
}

// Runs kernel() once per thread of every block of the grid.
template <typename Kernel>
void launch(dim3 grid, dim3 block, size_t dynamic_bytes, Kernel kernel) {
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  if (threads % 32 != 0) {
    std::fprintf(stderr, "cuda_host::launch: %u threads per block, not whole warps\n", threads);
    std::abort();
  }
  warp_barriers.clear();
  for (unsigned w = 0; w < threads / 32; ++w)
    warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
  shuffle_slots.assign(threads, 0.0);
  arrivals.reset(new std::atomic<long>[threads]);
  block_threads = threads;
  // Exactly the bytes asked for, rounded up to whole doubles (so AddressSanitizer, when the
  // test builds with it, sees any write past them).
  dynamic_shared.assign((dynamic_bytes + sizeof(double) - 1) / sizeof(double), 0.0);
  dynamic_shared.shrink_to_fit();
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_index = dim3(bx, by, bz);
        // Each block starts with NaN in its dynamic shared memory: a read of a value the block
        // never wrote poisons the result.
        std::fill(dynamic_shared.begin(), dynamic_shared.end(),
                  std::numeric_limits<double>::quiet_NaN());
        for (unsigned t = 0; t < threads; ++t) arrivals[t] = 0;
        std::vector<std::thread> pool;
        for (unsigned ty = 0; ty < block.y; ++ty)
          for (unsigned tx = 0; tx < block.x; ++tx)
            pool.emplace_back([=] {
              thread_index = dim3(tx, ty, 0);
              passed = 0;
              kernel();
              arrivals[linear_thread()] = LONG_MAX;
            });
        for (auto& t : pool) t.join();
      }
  block_barrier = nullptr;
}

inline void sync_threads() {
  const int me = linear_thread();
  arrivals[me].fetch_add(1);
  block_barrier->arrive_and_wait();
  ++passed;
  if (me >= 32) return;
  for (unsigned other = 32; other < block_threads; ++other)
    while (arrivals[other].load() <= passed) std::this_thread::yield();
}
}  // namespace cuda_host

#define threadIdx (cuda_host::thread_index)
#define blockIdx (cuda_host::block_index)
#define blockDim (cuda_host::block_dim)
#define gridDim (cuda_host::grid_dim)
#define __global__
#define __launch_bounds__(...)
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() cuda_host::sync_threads()
#define SFI_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(cuda_host::dynamic_shared.data())
using std::max;
using std::min;

// __shfl_down_sync within a warp of 32 consecutive threads: lanes whose source lies past the
// warp keep their own value, as on the GPU. Every thread of the warp must call it.
template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, int offset) {
  const int me = cuda_host::linear_thread();
  std::barrier<>& warp = *cuda_host::warp_barriers[me / 32];
  warp.arrive_and_wait();  // the warp's reads of the previous round are done
  cuda_host::shuffle_slots[me] = static_cast<double>(value);
  warp.arrive_and_wait();
  return me % 32 + offset < 32 ? static_cast<T>(cuda_host::shuffle_slots[me + offset]) : value;
}
