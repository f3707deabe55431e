// Philox4x32-10 counter-based generator (Salmon et al., SC'11), host and device.
//
// Stream layout used by every duo_fast op (docs/math.md §5):
//   key     = the 64-bit seed
//   counter = (stream lo, stream hi, position lo, position hi)
// where `stream` is the token index (or token * K + j for per-entry noise) and
// `position` = offset + n for the n-th 128-bit block a token draws. An op that
// draws at most P blocks per stream advances the generator's offset by P, so two
// calls never reuse a counter, and each token's numbers depend only on
// (seed, offset, token index): never on the thread or block that computes it.
#pragma once

#include <cstdint>

#include "duo_fast/common.h"

namespace duo_fast {

struct Philox4x32 {
  uint32_t v[4];
};

DUO_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  // nvcc turns this into mul.hi/mul.lo; g++ into one 64-bit multiply.
  const uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
}

// 10 rounds of Philox4x32 on (counter, key).
DUO_HD Philox4x32 philox4x32_10(Philox4x32 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += kW0;
      k1 += kW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, ctr.v[0], hi0, lo0);
    philox_mulhilo(kM1, ctr.v[2], hi1, lo1);
    ctr = Philox4x32{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
  }
  return ctr;
}

// The 128-bit block number `position` of stream `stream` under `seed`.
DUO_HD Philox4x32 philox_block(uint64_t seed, uint64_t stream, uint64_t position) {
  return philox4x32_10(
      Philox4x32{{uint32_t(stream), uint32_t(stream >> 32), uint32_t(position), uint32_t(position >> 32)}},
      uint32_t(seed), uint32_t(seed >> 32));
}

}  // namespace duo_fast
