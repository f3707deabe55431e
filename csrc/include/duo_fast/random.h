// Random variates from Philox words, in float64 (docs/math.md §4: categorical draws
// must not be truncated, so uniforms carry 53 random bits and Gumbel/exponential
// variates are formed in double).
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/philox.h"
#include "duo_fast/special.h"

namespace duo_fast {

constexpr double kTwoPi = 6.28318530717958647693;

// Uniform on the open interval (0, 1) from 64 random bits: the top 53 bits k give
// (k + 1/2) 2^-53 (exact below 1/2; above, rounded to the 2^-53 grid, and the one
// value that rounds to 1 is clamped to 1 - 2^-53), so log(u) and log1p(-u) are
// always finite.
DUO_HD double uniform53(uint32_t hi, uint32_t lo) {
  const uint64_t k = ((uint64_t(hi) << 32) | uint64_t(lo)) >> 11;
  const double u = (double(k) + 0.5) * 0x1.0p-53;
  return u < 0x1.fffffffffffffp-1 ? u : 0x1.fffffffffffffp-1;  // a compare, not a libm call
}

// Two uniforms (0,1) from one Philox block.
struct Uniform2 {
  double a, b;
};
DUO_HD Uniform2 uniform2(const Philox4x32& r) { return {uniform53(r.v[0], r.v[1]), uniform53(r.v[2], r.v[3])}; }

// Two independent N(0,1) from one Philox block (Box-Muller).
struct Normal2 {
  double a, b;
};
DUO_HD Normal2 normal2(const Philox4x32& r) {
  const Uniform2 u = uniform2(r);
  const double rad = sqrt(-2.0 * log(u.a));
  const double th = kTwoPi * u.b;
  return {rad * cos(th), rad * sin(th)};
}

// Standard exponential and Gumbel variates from a uniform on (0,1).
DUO_HD double exponential_from_uniform(double u) { return -log(u); }
DUO_HD double gumbel_from_uniform(double u) { return -log(-log(u)); }

// Uniform integer in [0, n) from 64 random bits, n <= 2^32 (multiply-shift;
// bias <= n / 2^64, far below anything a test could see).
DUO_HD uint32_t uniform_index(uint32_t hi, uint32_t lo, uint32_t n) {
  const uint64_t r = (uint64_t(hi) << 32) | uint64_t(lo);
  // floor(r * n / 2^64) without 128-bit types: split r into 32-bit halves.
  const uint64_t a = (r >> 32) * uint64_t(n);
  const uint64_t b = (r & 0xffffffffull) * uint64_t(n);
  return uint32_t((a + (b >> 32)) >> 32);
}

}  // namespace duo_fast
