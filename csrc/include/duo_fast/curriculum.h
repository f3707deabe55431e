// Row math of the exact curriculum soft input (SPEC 2c, 2d), shared by the CPU
// and CUDA kernels of curriculum_embed:
//   w_j = a~ [j = x] + s~ eps_j,  y_j = w_j / tau,  P = softmax(y),  h = P E,
//   z = argmax_j w_j
// with eps_j = eps[token, j] regenerated from the counter-based generator
// (never stored): forward and backward see the same scores on any device.
//
// Noise (SPEC 2c): Philox block at position offset + j/4 of stream `token`
// gives eps for j = 4i .. 4i+3 by Box-Muller, in float: radius from a full
// 32-bit uniform (|eps| up to 6.8, so the max of 50257 noises is cut off with
// probability < 1e-6), angle from 24 bits. The scores are formed in double,
// y_j - max in double, then exp in float: at 1/tau = 1e4 the exponent is still
// accurate to ~1e-12 (a float w would put 1e-3 errors into P).
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/philox.h"

namespace duo_fast {
namespace curriculum {

constexpr int kNoisePerBlock = 4;

// eps[token, 4i .. 4i+3].
DUO_HD void noise4(uint64_t seed, uint64_t offset, uint64_t token, int64_t block, float* eps) {
  const Philox4x32 b = philox_block(seed, token, offset + uint64_t(block));
  constexpr float kTwoPiF = 6.28318530717958647693f;
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const float u1 = float((double(b.v[2 * p]) + 0.5) * 0x1.0p-32);  // (0, 1): log finite
    const float u2 = float(b.v[2 * p + 1] >> 8) * 0x1.0p-24f;          // [0, 1)
    const float r = sqrtf(-2.0f * logf(u1));
    float sn, cs;
    sincosf(kTwoPiF * u2, &sn, &cs);
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
