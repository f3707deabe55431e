// Portability macros shared by the CPU (g++), CUDA (nvcc) and emulated-CUDA (g++) builds.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DUO_HD __host__ __device__ __forceinline__
#define DUO_HD_ALWAYS __host__ __device__ __forceinline__
#define DUO_DEVICE __device__ __forceinline__
#else
#define DUO_HD inline
// Small per-entry helpers of vectorized CPU loops (fast_math.h, the logits.h
// conversions): always inlined, since a call inside a loop stops GCC's
// vectorizer, and GCC's inliner gives up on plain `inline` once a translation
// unit instantiates the row kernels for several dtypes (found: usdm_loss 6x
// slower when its rows were instantiated for float32, bfloat16 and float16).
#define DUO_HD_ALWAYS __attribute__((always_inline)) inline
#define DUO_DEVICE inline
#endif

namespace duo_fast {

// Bounds shared by the Python checks, the C++ checks and the kernels.
constexpr int64_t kMinVocab = 2;
constexpr int64_t kMaxVocab = int64_t(1) << 24;
// The float32 range of levels that kernels use in float32: inv_tau scales the
// noise, 1/temperature the logits, and a loss is a float32 number.
constexpr double kFloat32Max = 3.4028234663852886e38;   // FLT_MAX
constexpr double kFloat32Tiny = 1.1754943508222875e-38;  // FLT_MIN, the smallest normal float

}  // namespace duo_fast
