// What a duo_fast CUDA kernel source includes: the CUDA runtime under nvcc, or
// the test-only CUDA-execution emulation (tests/emulation/cuda_emulation.h)
// when the same source is compiled by g++ with -DDUO_FAST_EMULATE_CUDA.
// Kernels launch only through duo_fast::launch_kernel so both compilers
// accept the call (see docs/cuda_emulation.md, "Rules for kernel authors").
#pragma once

#include <cstddef>
#include <utility>

#if defined(DUO_FAST_EMULATE_CUDA)
#include "cuda_emulation.h"
// Dynamic shared memory: extern __shared__ does not compile under g++.
#define DUO_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::cuda_emu::dynamic_smem())
#else
#include <cuda_runtime.h>
#define DUO_DYNAMIC_SHARED(T, name)                         \
  extern __shared__ __align__(16) unsigned char duo_smem_[]; \
  T* name = reinterpret_cast<T*>(duo_smem_)
#endif

#include "duo_fast/common.h"

namespace duo_fast {

// Launch `kernel` on `stream`; returns the launch error (cudaSuccess if none).
template <class... KArgs, class... Args>
cudaError_t launch_kernel(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                          Args&&... args) {
#if defined(DUO_FAST_EMULATE_CUDA)
  ::cuda_emu::launch(kernel, grid, block, smem_bytes, stream, std::forward<Args>(args)...);
#else
  kernel<<<grid, block, smem_bytes, stream>>>(std::forward<Args>(args)...);
#endif
  return cudaGetLastError();
}

// Blocks of `threads` covering n items, capped for grid-stride loops.
inline unsigned grid_size(long long n, unsigned threads, unsigned max_blocks = 65535u) {
  long long b = (n + threads - 1) / threads;
  if (b < 1) b = 1;
  return b > max_blocks ? max_blocks : unsigned(b);
}

}  // namespace duo_fast
