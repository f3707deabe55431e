// Portability macros shared by the CPU (g++), CUDA (nvcc) and emulated-CUDA (g++) builds.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DUO_HD __host__ __device__ __forceinline__
#define DUO_DEVICE __device__ __forceinline__
#else
#define DUO_HD inline
#define DUO_DEVICE inline
#endif

namespace duo_fast {

// Bounds shared by the Python checks, the C++ checks and the kernels.
constexpr int64_t kMinVocab = 2;
constexpr int64_t kMaxVocab = int64_t(1) << 24;

}  // namespace duo_fast
