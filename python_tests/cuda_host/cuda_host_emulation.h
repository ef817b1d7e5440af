// Runs CUDA kernels as host C++, for the kernel tests only (CI has no GPU). Each block's threads
// are std::threads that meet at a barrier for __syncthreads and for the warp shuffle; blocks
// run one after another, so a kernel's __shared__ array (here a function-local static) is its
// block's. Enough for the row-blocked MCSConv kernels: float and double, no half types.
#pragma once

#include <algorithm>
#include <barrier>
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
inline std::vector<double> shuffle_slots;  // one per thread of the block
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
  shuffle_slots.assign(threads, 0.0);
  dynamic_shared.assign(dynamic_bytes / sizeof(double) + 1, 0.0);
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        block_index = dim3(bx, by, bz);
        std::vector<std::thread> pool;
        for (unsigned ty = 0; ty < block.y; ++ty)
          for (unsigned tx = 0; tx < block.x; ++tx)
            pool.emplace_back([=] {
              thread_index = dim3(tx, ty, 0);
              kernel();
            });
        for (auto& t : pool) t.join();
      }
  block_barrier = nullptr;
}
}  // namespace cuda_host

#define threadIdx (cuda_host::thread_index)
#define blockIdx (cuda_host::block_index)
#define blockDim (cuda_host::block_dim)
#define gridDim (cuda_host::grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() cuda_host::block_barrier->arrive_and_wait()
#define SFI_DYNAMIC_SHARED(type, name) \
  type* name = reinterpret_cast<type*>(cuda_host::dynamic_shared.data())
using std::max;
using std::min;

// __shfl_down_sync over warps of 32 consecutive threads: lanes whose source lies past the warp
// keep their own value, as on the GPU. Every thread of the block must call it (the kernels here
// only call it from block-wide reductions).
template <typename T>
T __shfl_down_sync(unsigned /*mask*/, T value, int offset) {
  const int me = cuda_host::linear_thread();
  cuda_host::block_barrier->arrive_and_wait();  // the previous round's reads are done
  cuda_host::shuffle_slots[me] = static_cast<double>(value);
  cuda_host::block_barrier->arrive_and_wait();
  return me % 32 + offset < 32 ? static_cast<T>(cuda_host::shuffle_slots[me + offset]) : value;
}
