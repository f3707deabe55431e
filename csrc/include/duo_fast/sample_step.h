// Row math of the reverse-process step (docs/math.md §4), shared by the CPU and
// CUDA kernels of sample_step and posterior.
//
// Posterior as a mixture. With p = softmax(logits / T) (nucleus-filtered when
// top_p < 1), D = K at p_z + 1 - at and r = at / as,
//   q_post(as) = [(K at p_z + r - at) 1_z + (as - at) p + (1 - r)(1 - as) U] / D
// where U is the uniform law on [0, K) (its K entries of mass 1/K carry the
// (1 - r)(1 - as)/K of docs/math.md §4). The three masses sum to 1. The Psi-sampler mix
//   kappa q_post(as) + (1 - kappa) (as q_post(1) + (1 - as) U)
// is again point mass at z + p + U, with q_post(1) = [K at p_z 1_z + (1 - at) p] / D.
// So a draw needs only p_z (one reduction) and one draw from p.
//
// Draw from p: inverse CDF with one 53-bit uniform, u * S against the running
// sum of the weights w_j = exp((x_j - max) / T) in index order. This is exact
// like the Gumbel-max / exponential race (no truncated tail above 2^-125 of the
// max, see weight(): a token of probability 1e-9 owns an interval of u of that
// width) but uses two uniforms
// per token instead of K, which makes the CPU kernel about as cheap as the
// log-sum-exp itself. Random numbers: one Philox block per token (stream =
// row_offset + token, position = offset; row_offset > 0 when a call draws rows
// of a larger one, chunk by chunk): words 0,1 -> u_part (which mixture part),
// words 2,3 -> u_cat (the inverse-CDF uniform, or the uniform part's id; only
// one of the two is used, so they may share bits).
//
// Nucleus (top_p < 1, utils.top_k_top_p_filtering): sort descending with ties
// by lower id first and keep rank r iff the mass of ranks < r is <= top_p.
// Entries are ranked by a unique 64-bit key (order-preserving bits of the
// logit, then the complemented id), and the boundary key k* is found without a
// sort by a radix select over the key bytes: one pass per byte builds a
// 256-bin histogram of weight (and count) of the entries that share the
// prefix decided so far; the boundary byte is the one where the mass of
// higher keys first exceeds top_p * S. It stops as soon as the boundary bin
// holds one entry (usually after 2-3 passes; at most 8). Kept: key >= k*.
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/fast_math.h"
#include "duo_fast/logits.h"
#include "duo_fast/philox.h"
#include "duo_fast/random.h"

namespace duo_fast {
namespace sampling {

// Unnormalized probability of logit x <= m given the row max m: exp((x - m) / T),
// by fastmath::exp_nonpos (<= 1 ulp; plain arithmetic, so the CPU kernel
// vectorizes it and the CPU and the emulated CUDA kernels get the same bits).
// Weights below 2^-125 are 0: a row loses less than K 2^-125 of its mass, far
// below the 2^-53 steps of the inverse-CDF uniform. NaN gives 0 (the kernels
// screen NaN rows).
DUO_HD_ALWAYS float weight(float x, float m, float inv_temperature) {
  return fastmath::exp_nonpos((x - m) * inv_temperature);
}

// Unique rank key: higher key = higher logit, ties broken by lower id.
DUO_HD uint64_t rank_key(float x, int64_t j) {
  const uint32_t b = bits_from_float(x + 0.0f);  // -0 + 0 = +0: -0 ranks like +0
  // Negative: flip all bits; else flip the sign bit (branch-free: signs are random).
  const uint32_t ordered = b ^ (uint32_t(int32_t(b) >> 31) | 0x80000000u);
  return (uint64_t(ordered) << 32) | uint64_t(0xffffffffu - uint32_t(j));
}

// Masses of the three mixture parts (they sum to 1 up to rounding).
struct Mixture {
  double z, p, u;
};

DUO_HD Mixture mixture(double alpha_t, double alpha_s, double kappa, double vocab_size, double p_z) {
  const double at = alpha_t, as = alpha_s, K = vocab_size;
  const double d = K * at * p_z + 1.0 - at;
  const double r = at / as;
  const Mixture post{(K * at * p_z + r - at) / d, (as - at) / d, (1.0 - r) * (1.0 - as) / d};
  if (kappa == 1.0) return post;
  // q_post(1) = [K at p_z 1_z + (1 - at) p] / d, forward-noised to level as.
  const Mixture pc{as * K * at * p_z / d, as * (1.0 - at) / d, 1.0 - as};
  return {kappa * post.z + (1.0 - kappa) * pc.z, kappa * post.p + (1.0 - kappa) * pc.p,
          kappa * post.u + (1.0 - kappa) * pc.u};
}

enum Part : int { kPointZ = 0, kModel = 1, kUniform = 2 };

struct StepDraw {
  double u_part;         // picks the mixture part
  double u_cat;          // inverse-CDF uniform of the model part
  uint32_t hi, lo;       // the same bits as u_cat, for the uniform part's id
};

DUO_HD StepDraw step_draw(uint64_t seed, uint64_t offset, uint64_t token) {
  const Philox4x32 b = philox_block(seed, token, offset);
  return {uniform53(b.v[0], b.v[1]), uniform53(b.v[2], b.v[3]), b.v[2], b.v[3]};
}

DUO_HD Part choose_part(const Mixture& w, double u) {
  const double t = u * (w.z + w.p + w.u);
  if (t < w.z) return kPointZ;
  if (t < w.z + w.p) return kModel;
  return kUniform;  // also where NaN weights (NaN logits) make every test false
}

// Radix select of the nucleus boundary (see the header comment). The caller
// fills hist/count for the entries whose key >> shift(level) + 8 equals the
// prefix (all entries at level 0), then calls choose_digit.
struct Nucleus {
  uint64_t prefix;  // key bytes decided so far
  int level;        // bytes decided
  double above;     // mass of the keys above the current prefix
  double target;    // top_p * S
  bool done;        // the boundary bin holds one entry
  double kept;      // mass of the kept set (valid once done)
};

constexpr int kRadixBins = 256;

DUO_HD Nucleus nucleus_start(double top_p, double total) { return {0, 0, 0.0, top_p * total, false, 0.0}; }

// Bits of the key below the byte chosen at `level`.
DUO_HD int nucleus_shift(int level) { return 56 - 8 * level; }

// Does key share the prefix decided before `level`?
DUO_HD bool nucleus_match(const Nucleus& s, uint64_t key) {
  return s.level == 0 || (key >> (nucleus_shift(s.level) + 8)) == s.prefix;
}

DUO_HD int nucleus_digit(const Nucleus& s, uint64_t key) { return int((key >> nucleus_shift(s.level)) & 0xffu); }

DUO_HD void choose_digit(Nucleus& s, const double* hist, const uint32_t* count) {
  int pick = -1, lowest = -1;
  for (int d = kRadixBins - 1; d >= 0; --d) {
    if (count[d] == 0) continue;
    lowest = d;
    if (s.above + hist[d] > s.target) {
      pick = d;
      break;
    }
    s.above += hist[d];
  }
  if (pick < 0) {  // rounding left the target above the total: keep everything
    pick = lowest;
    s.above -= hist[pick];
  }
  s.prefix = (s.prefix << 8) | uint64_t(pick);
  s.level += 1;
  if (count[pick] == 1 || s.level == 8) {
    s.done = true;
    s.kept = s.above + hist[pick];
  }
}

// The unique key with the decided prefix is the boundary k*; kept iff key >= k*,
// i.e. iff the key's top `level` bytes are >= the prefix.
DUO_HD bool nucleus_kept(const Nucleus& s, uint64_t key) {
  const int shift = 64 - 8 * s.level;
  return shift >= 64 ? true : (key >> shift) >= s.prefix;
}

}  // namespace sampling
}  // namespace duo_fast
