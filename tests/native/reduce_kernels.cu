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

constexpr int kHistBins = 64;

// Per-row histogram of (bin, value) pairs (bin < 0: no entry), as the top-p radix
// passes build theirs: reduce::warp_histogram_add into one row per warp, the rows
// merged in warp order. atomic = 1 is the old way (atomicAdd on one shared row):
// contended and summed in a run-dependent order.
__global__ void histogram_kernel(const int* __restrict__ bins, const double* __restrict__ vals, int64_t rows,
                                 int64_t cols, double* __restrict__ out_sum, uint32_t* __restrict__ out_count,
                                 int atomic) {
  __shared__ double hist[32][kHistBins];
  __shared__ uint32_t count[32][kHistBins];
  const int warps = int(blockDim.x >> 5), warp = int(threadIdx.x >> 5);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    for (int i = threadIdx.x; i < 32 * kHistBins; i += blockDim.x) hist[i / kHistBins][i % kHistBins] = 0.0, count[i / kHistBins][i % kHistBins] = 0;
    __syncthreads();
    for (int64_t base = 0; base < cols; base += blockDim.x) {
      const int64_t j = base + threadIdx.x;
      const int b = j < cols ? bins[r * cols + j] : -1;
      const double v = j < cols ? vals[r * cols + j] : 0.0;
      if (atomic) {
        if (b >= 0) atomicAdd(&hist[0][b], v), atomicAdd(&count[0][b], 1u);
      } else {
        reduce::warp_histogram_add(hist[warp], count[warp], b, v);
      }
    }
    __syncthreads();
    for (int d = threadIdx.x; d < kHistBins; d += blockDim.x) {
      double h = hist[0][d];
      uint32_t c = count[0][d];
      for (int w = 1; w < warps && !atomic; ++w) h += hist[w][d], c += count[w][d];
      out_sum[r * kHistBins + d] = h;
      out_count[r * kHistBins + d] = c;
    }
    __syncthreads();
  }
}

}  // namespace test
}  // namespace duo_fast

extern "C" int df_emu_row_reductions(const float* x, int64_t rows, int64_t cols, float* out, int threads, int blocks) {
  return int(duo_fast::launch_kernel(duo_fast::test::row_reductions_kernel, dim3(unsigned(blocks)),
                                     dim3(unsigned(threads)), 0, nullptr, x, rows, cols, out));
}

extern "C" int df_emu_histogram(const int* bins, const double* vals, int64_t rows, int64_t cols, double* out_sum,
                                uint32_t* out_count, int threads, int blocks, int atomic) {
  return int(duo_fast::launch_kernel(duo_fast::test::histogram_kernel, dim3(unsigned(blocks)), dim3(unsigned(threads)),
                                     0, nullptr, bins, vals, rows, cols, out_sum, out_count, atomic));
}
