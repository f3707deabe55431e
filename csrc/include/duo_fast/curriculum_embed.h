// Row math of the exact curriculum soft input (docs/math.md §2c, §2d), shared by the CPU
// and CUDA kernels of curriculum_embed:
//   w_j = a~ [j = x] + s~ eps_j,  y_j = w_j / tau,  P = softmax(y),  h = P E,
//   z = argmax_j w_j
// with eps_j = eps[token, j] regenerated from the counter-based generator
// (never stored): forward and backward see the same scores on any device.
//
// Noise (docs/math.md §2c): Philox block at position offset + j/4 of stream `token`
// gives eps for j = 4i .. 4i+3 by Box-Muller, in float: words 0, 1 -> eps 4i,
// 4i+1 and words 2, 3 -> eps 4i+2, 4i+3; radius sqrt(-2 log u1) from a full
// 32-bit uniform u1 = (w + 1/2) 2^-32 rounded to float (|eps| up to 6.8, so the
// max of 50257 noises is cut off with probability < 1e-6), angle 2 pi u2 from
// 24 bits. log, sin and cos are the polynomials below (plain float arithmetic,
// no libm): the CPU kernel runs the same functions in loops GCC vectorizes, the
// CUDA kernel runs them per thread, so both see the same eps (to the rounding
// of fused multiply-adds, which nvcc forms and the x86-64 CPU build does not:
// <= ~2 ulp). sqrt is IEEE (correctly rounded on both).
// Accuracy against double libm: -2 log u1 <= 0.83 ulp (every 7th of the 2^32
// words), cos and sin within 9.1e-8 absolute (all 2^24 angles), eps within
// 5.9e-7 of the exact value of its definition (libm's sincosf of the rounded
// float 2 pi u2 was off by up to 1.7e-6).
//
// The scores are formed in double, y_j - max in double, then exp in float: at
// 1/tau = 1e4 the exponent is still accurate to ~1e-12 (a float w would put
// 1e-3 errors into P). The CPU kernel forms the same exponent as
// c (eps_j - eps_ref) + (y_ref - max), c = s~/tau, which is as accurate.
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/fast_math.h"
#include "duo_fast/logits.h"
#include "duo_fast/philox.h"

namespace duo_fast {
namespace curriculum {

constexpr int kNoisePerBlock = 4;

// u1 = (w + 1/2) 2^-32 in (0, 1), rounded to float (the conversion through a
// signed int32 so that vector units have it: double(w) exactly).
DUO_HD float radius_uniform(uint32_t w) {
  return float((double(int32_t(w ^ 0x80000000u)) + 2147483648.5) * 0x1.0p-32);
}

// -2 log(u) for u in [2^-33, 1] (a positive normal float); the factor -2 is exact.
DUO_HD float minus_two_log(float u) { return -2.0f * fastmath::log_positive(u); }

// (cos, sin) of 2 pi m / 2^24 for m = w >> 8: quadrant q = round(4 m / 2^24),
// theta = 2 pi f, f = m / 2^24 - q / 4 in [-1/8, 1/8] exactly, Cephes sinf /
// cosf polynomials on [-pi/4, pi/4], then the quadrant's swap and signs on the bits.
DUO_HD void angle_cos_sin(uint32_t w, float& c, float& s) {
  const int32_t m = int32_t(w >> 8);
  const int32_t q = (m + (1 << 21)) >> 22;  // 0 .. 4
  const float x = float(m - (q << 22)) * (6.28318530717958647693f * 0x1.0p-24f);
  const float z = x * x;
  float ps = -1.9515295891e-4f;
  ps = ps * z + 8.3321608736e-3f;
  ps = ps * z - 1.6666654611e-1f;
  const float sn = (ps * z) * x + x;
  float pc = 2.443315711809948e-5f;
  pc = pc * z - 1.388731625493765e-3f;
  pc = pc * z + 4.166664568298827e-2f;
  const float cs = (pc * z) * z - 0.5f * z + 1.0f;
  const uint32_t swap = uint32_t(-(q & 1)), bs = bits_from_float(sn), bc = bits_from_float(cs);
  c = float_from_bits(((bs & swap) | (bc & ~swap)) ^ (uint32_t((q + 1) & 2) << 30));
  s = float_from_bits(((bc & swap) | (bs & ~swap)) ^ (uint32_t(q & 2) << 30));
}

// eps[token, 4i .. 4i+3].
DUO_HD void noise4(uint64_t seed, uint64_t offset, uint64_t token, int64_t block, float* eps) {
  const Philox4x32 b = philox_block(seed, token, offset + uint64_t(block));
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const float r = sqrtf(minus_two_log(radius_uniform(b.v[2 * p])));
    float cs, sn;
    angle_cos_sin(b.v[2 * p + 1], cs, sn);
    eps[2 * p] = r * cs;
    eps[2 * p + 1] = r * sn;
  }
}

// Philox blocks per token (the generator offset advance of one call).
DUO_HD uint64_t blocks_per_token(int64_t vocab_size) { return uint64_t((vocab_size + kNoisePerBlock - 1) / kNoisePerBlock); }

// Scale-free score of entry j: w_j = a~ [j = x] + s~ eps_j (double).
DUO_HD double latent(float eps, bool is_x, double a, double s) { return s * double(eps) + (is_x ? a : 0.0); }

}  // namespace curriculum
}  // namespace duo_fast
