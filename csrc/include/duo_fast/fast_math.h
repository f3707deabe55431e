// Float32 exp and log1p for loops GCC auto-vectorizes on the CPU: plain
// arithmetic and integer bit tricks only (no libm calls, no fmaf/rintf), so any
// target (SSE2 baseline, AVX2) keeps them inline; where FMA is enabled the GNU
// default -ffp-contract=fast fuses the products, which only tightens rounding.
// Coefficients are Cephes' expf/logf (Moshier).
//
// Accuracy against long double over 2^24 random arguments: exp_nonpos <= 1.0 ulp
// on [-86, 0]; log1p_nonneg <= 1.2 ulp on [1e-40, 1e30].
#pragma once

#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/logits.h"

namespace duo_fast {
namespace fastmath {

DUO_HD_ALWAYS int32_t as_int(float x) { return int32_t(bits_from_float(x)); }
DUO_HD_ALWAYS float as_float(int32_t i) { return float_from_bits(uint32_t(i)); }

// exp(d) for d <= 0 (d = x - max; the sign of d is ignored). exp(d) = 2^k exp(f),
// k = round(d / ln2), f = d - k ln2 in [-ln2/2, ln2/2] (ln2 in two parts:
// k * 0.693359375 is exact for |k| < 2^15). Results below 2^kMinK flush to +0
// (k < kMinK), so with kMinK >= -125 no subnormal float is ever produced (they
// cost ~100 cycles an operation on x86); -inf and NaN give 0 too (callers screen
// NaN). Selects are on integers: GCC folds a float select with a constant arm
// into a branch (-ftrapping-math then stops the vectorizer).
template <int kMinK = -125>
DUO_HD_ALWAYS float exp_nonpos(float d) {
  static_assert(kMinK >= -125 && kMinK <= 0);
  const int32_t mag = as_int(d) & 0x7fffffff;  // |d|, clamped to 100
  const float dc = -as_float(mag < 0x42c80000 ? mag : 0x42c80000);
  const float t = dc * 1.44269504089f + 12582912.0f;  // 1.5 * 2^23: k lands in the low mantissa bits
  const float k = t - 12582912.0f;
  int32_t ki = as_int(t) - 0x4b400000;
  ki = ki < kMinK ? -127 : ki;
  float f = dc - k * 0.693359375f;
  f = f - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  const float ef = (p * f) * f + f + 1.0f;
  return ef * as_float((ki + 127) << 23);  // 2^k, or +0 when ki = -127
}

// c ? a : b through the bits: GCC turns a float select whose arms it computes
// (or can fold) into a branch, which the vectorizer then refuses.
DUO_HD_ALWAYS float select(bool c, float a, float b) {
  const int32_t m = -int32_t(c);
  return as_float((as_int(a) & m) | (as_int(b) & ~m));
}

// log(y) for a positive normal float y: y = 2^e m, m in [sqrt(1/2), sqrt(2)),
// and log(m) = f - f^2/2 + f^3 P(f), f = m - 1 (Cephes logf).
DUO_HD_ALWAYS float log_positive(float y) {
  const int32_t iy = as_int(y) + (0x3f800000 - 0x3f3504f3);
  const float e = float((iy >> 23) - 0x7f);
  const float f = as_float((iy & 0x007fffff) + 0x3f3504f3) - 1.0f;
  const float f2 = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float lo = (p * f) * f2 + e * -2.12194440e-4f - 0.5f * f2;
  return (f + lo) + e * 0.693359375f;
}

// log1p(u) for u >= 0, given y = 1 + u (rounded) and q = 1 / y: log(y) plus the
// rounding of 1 + u, log1p(u) = log(y) + (u - (y - 1)) / y (first order; y - 1
// and u - (y - 1) are exact).
DUO_HD_ALWAYS float log1p_nonneg(float u, float y, float q) { return log_positive(y) + (u - (y - 1.0f)) * q; }

}  // namespace fastmath
}  // namespace duo_fast
