// Test-only kernels exercising duo_fast/reduce.h: one block per row computes the
// row's sum, max and log-sum-exp (online softmax), with any blockDim.x that is a
// multiple of 32. Compiled into the emulated test library and by nvcc in
// tests/test_build.py; never part of the shipped extension.
#include "duo_fast/cuda_compat.h"
#include "duo_fast/reduce.h"

namespace duo_fast {
namespace test {

__global__ void row_reductions_kernel(const float* __restrict__ x, int64_t rows, int64_t cols,
                                      float* __restrict__ out /* [rows, 3]: sum, max, lse */) {
  __shared__ float scratch_f[32];
  __shared__ reduce::MaxSum<float> scratch_ms[32];
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const float* row = x + r * cols;
    float sum = 0.0f, mx = -INFINITY;
    reduce::MaxSum<float> ms = reduce::max_sum_identity<float>();
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float v = row[j];
      sum += v;
      mx = fmaxf(mx, v);
      ms = reduce::max_sum_push(ms, v);
    }
    sum = reduce::block_reduce(sum, reduce::Sum(), 0.0f, scratch_f);
    mx = reduce::block_reduce(mx, reduce::Max(), -INFINITY, scratch_f);  // scratch reused at once
    ms = reduce::block_reduce_max_sum(ms, scratch_ms);
    if (threadIdx.x == 0) {
      out[r * 3 + 0] = sum;
      out[r * 3 + 1] = mx;
      out[r * 3 + 2] = reduce::max_sum_lse(ms);
    }
  }
}

}  // namespace test
}  // namespace duo_fast

extern "C" int df_emu_row_reductions(const float* x, int64_t rows, int64_t cols, float* out, int threads, int blocks) {
  return int(duo_fast::launch_kernel(duo_fast::test::row_reductions_kernel, dim3(unsigned(blocks)),
                                     dim3(unsigned(threads)), 0, nullptr, x, rows, cols, out));
}
