// Inverse-CDF draw over a scratch row of weights, shared by the CPU kernels of
// sample_step and canvas_step: the host twin of cuda/inverse_cdf.cuh (which
// recomputes the weights from the logits tile by tile instead).
#pragma once

#include <cstdint>

namespace duo_fast {
namespace sampling {

// The first j whose inclusive running sum of w[0 .. K) (float64) exceeds
// target = u * sum(w); zero weights are never drawn (the sum does not move).
// The running sum advances a block of kBlock weights at a time while the target
// lies beyond the block (the block's sum vectorized, float64), then entry by
// entry inside the block that crosses it: a read of the row's head instead of
// a chain of K dependent adds. The blocked order rounds differently from a
// strictly sequential sum at the 1e-16 relative level; where it left the
// target short of the block's entries, the scan just goes on. Where rounding
// left the target at the total: the last positive weight; -1 when there is
// none (a NaN row).
[[gnu::always_inline]] inline int64_t inverse_cdf(const float* w, int64_t K, double target) {
  constexpr int64_t kBlock = 64;
  double run = 0.0;
  int64_t j = 0;
  for (; j + kBlock <= K; j += kBlock) {
    double b = 0.0;
#pragma omp simd reduction(+ : b)
    for (int64_t i = j; i < j + kBlock; ++i) b += double(w[i]);
    if (run + b > target) break;
    run += b;
  }
  for (; j < K; ++j) {
    run += w[j];
    if (run > target) return j;
  }
  for (int64_t i = K - 1; i >= 0; --i)
    if (w[i] > 0.0f) return i;
  return -1;
}

}  // namespace sampling
}  // namespace duo_fast
