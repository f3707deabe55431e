// Row math of the Duo++ top-k curriculum input (docs/math.md §2e), shared by the CPU and
// CUDA kernels of curriculum_topk and curriculum_topk_embed. Per token, with
// a~ = sqrt(sigmoid(-gamma)), s~ = sqrt(sigmoid(gamma)), N' = K - 1:
//
// 1. Order statistics of N' iid s~ N(0,1) from the top (Renyi):
//      log V_i = sum_{r <= i} log(U_r) / (N' - r + 1),  o_i = s~ Phi^-1(V_i)
//    with Phi^-1(V) = -Phi^-1(1 - V), 1 - V = -expm1(log V) (no loss near 1).
// 2. e_x = a~ + s~ xi; in_topk = e_x > o_k; kept = o_1..o_{k-1} and e_x (in) or
//    o_k (out); threshold c = o_{k-1} (in; +inf for k = 1) or o_k; tail count
//    n = K - k (in) or K - k - 1.
// 3. log mu = S^2/2 + log Phi((c/tau - S^2)/S) - log Phi((c/tau)/S), S = s~/tau:
//    E[exp(X/tau) | X < c] for X ~ N(0, s~^2).
// 4. log Z = logsumexp(kept/tau, log n + log mu, e_x/tau if out); w_i =
//    exp(kept_i/tau - log Z); all zero -> one-hot on the largest kept entry.
// 5. ids: a uniformly random ordered k-tuple of distinct ids != x (sparse
//    Fisher-Yates: step i swaps position i with i + U[0, N' - i), the swaps kept
//    in a small hash map, so k draws and O(k) memory for any k <= K - 1); the
//    last id is x when in_topk.
// 7. z = x iff e_x > o_1 ("exact", P(z = x) = pt(gamma)); the reference rule
//    is z = x iff in_topk.
//
// Phi^-1 is Acklam's approximation (relative 1.15e-9) refined by a Halley step
// only where the weights need it: o_i enters only through exp(o_i / tau), so
// the approximation is used while s~ |Phi^-1| / tau * 1.15e-9 < 3e-8 (below
// half an ulp of the float32 weights) and the full-precision ndtri beyond.
//
// Random numbers, stream = token: position offset -> xi (Box-Muller);
// offset + 1 + i/2 -> U_i (two 53-bit uniforms per block); offset + 1 + H + i/2,
// H = ceil(k/2) -> the Fisher-Yates index of step i (64 bits each).
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/philox.h"
#include "duo_fast/random.h"
#include "duo_fast/special.h"

namespace duo_fast {
namespace topk {

enum ZtRule : int { kExact = 0, kReference = 1 };

struct Scales {
  double a, s;  // a~, s~
};

// a~^2 = sigmoid(-gamma), s~^2 = sigmoid(gamma), each without overflow.
DUO_HD Scales scales(double gamma) {
  const double e = exp(-fabs(gamma));  // in (0, 1]
  const double big = sqrt(1.0 / (1.0 + e)), small = sqrt(e / (1.0 + e));
  return gamma >= 0.0 ? Scales{small, big} : Scales{big, small};
}

// Sparse identity permutation of [0, n): position -> value, only displaced
// positions stored (open addressing, linear probing, capacity a power of two
// >= 2k). keys/vals: caller memory of `cap` int32 each.
struct SwapMap {
  int32_t* keys;
  int32_t* vals;
  uint32_t mask;

  DUO_HD uint32_t slot(int32_t pos) const {
    uint32_t h = uint32_t(pos) * 2654435761u;  // Knuth's multiplicative hash
    h ^= h >> 15;
    h &= mask;
    while (keys[h] != pos && keys[h] != -1) h = (h + 1) & mask;
    return h;
  }
  DUO_HD int32_t get(int32_t pos) const {
    const uint32_t h = slot(pos);
    return keys[h] == pos ? vals[h] : pos;
  }
  DUO_HD void set(int32_t pos, int32_t val) {
    const uint32_t h = slot(pos);
    keys[h] = pos;
    vals[h] = val;
  }
};

DUO_HD uint32_t swap_map_capacity(int64_t k) {
  uint32_t c = 4;
  while (int64_t(c) < 2 * k) c <<= 1;
  return c;
}

DUO_HD uint64_t blocks_per_token(int64_t k) { return 1 + 2 * uint64_t((k + 1) / 2); }

// The random inputs of one token (also exported to the tests, which feed them
// to the float64 reference). U_1..U_k in (0, 1):
DUO_HD void draw_uniforms(uint64_t seed, uint64_t offset, uint64_t stream, int64_t k, double* u) {
  for (int64_t i = 0; i < k; i += 2) {
    const Uniform2 b = uniform2(philox_block(seed, stream, offset + 1 + uint64_t(i / 2)));
    u[i] = b.a;
    if (i + 1 < k) u[i + 1] = b.b;
  }
}

// xi ~ N(0, 1) of the x-entry.
DUO_HD double draw_xi(uint64_t seed, uint64_t offset, uint64_t stream) {
  return normal2(philox_block(seed, stream, offset)).a;
}

// A uniformly random ordered k-tuple of distinct ids != x (sparse Fisher-Yates
// over the K - 1 others). `map` must be empty; it is left dirty.
DUO_HD void draw_ranks(uint64_t seed, uint64_t offset, uint64_t stream, int64_t k, int64_t vocab_size, int64_t x,
                       SwapMap map, int64_t* ids) {
  const uint64_t base = offset + 1 + uint64_t((k + 1) / 2);
  const uint32_t n = uint32_t(vocab_size - 1);
  for (int64_t i = 0; i < k; i += 2) {
    const Philox4x32 b = philox_block(seed, stream, base + uint64_t(i / 2));
    for (int64_t e = 0; e < 2 && i + e < k; ++e) {
      const int32_t pos = int32_t(i + e);
      const int32_t j = pos + int32_t(uniform_index(b.v[2 * e], b.v[2 * e + 1], n - uint32_t(pos)));
      const int32_t vj = map.get(j);
      if (j != pos) map.set(j, map.get(pos));  // position pos is never drawn again
      ids[pos] = int64_t(vj) + (int64_t(vj) >= x ? 1 : 0);  // [0, K-1) -> ids != x
    }
  }
}

struct TokenOut {
  int64_t z;     // the discrete latent
  bool in_topk;  // x-entry among the top k (then the last id is x)
};

// One token: writes ids[k] (int64) and weights[k] (float) and returns z.
// `map` must be empty (all keys -1) on entry and is left dirty (the caller
// clears it); kept: scratch of k doubles.
DUO_HD TokenOut token(uint64_t seed, uint64_t offset, uint64_t stream, int64_t x, double gamma, double inv_tau,
                      int64_t k, int64_t vocab_size, int zt_rule, SwapMap map, int64_t* ids, float* weights,
                      double* kept) {
  const Scales sc = scales(gamma);
  const double n_others = double(vocab_size - 1);

  // 1. order statistics, descending (kept[] holds U_i, then o_i).
  draw_uniforms(seed, offset, stream, k, kept);
  // Refine only where the approximation's error would reach the float32 weights:
  // d(log w) = s~ |Phi^-1| / tau * 1.15e-9 above 3e-8 (half an ulp).
  const double refine_above = 3e-8 / (1.15e-9 * sc.s * inv_tau);
  double log_v = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    log_v += log(kept[i]) / (n_others - double(i));
    const double q = -expm1(log_v);  // 1 - V_i
    double phi_inv = -ndtri_approx(q);
    if (phi_inv > refine_above || -phi_inv > refine_above) phi_inv = -ndtri(q);
    kept[i] = sc.s * phi_inv;
  }
  const double o_1 = kept[0], o_k = kept[k - 1];

  // 2. the x-entry.
  const double e_x = sc.a + sc.s * draw_xi(seed, offset, stream);
  const bool in_topk = e_x > o_k;
  const double c = in_topk ? (k >= 2 ? kept[k - 2] : INFINITY) : o_k;
  const double n_tail = double(in_topk ? vocab_size - k : vocab_size - k - 1);
  if (in_topk) kept[k - 1] = e_x;

  // 3. tail mass.
  const double S = sc.s * inv_tau, ct = c * inv_tau;
  const double log_mu = 0.5 * S * S + log_ndtr((ct - S * S) / S) - log_ndtr(ct / S);
  const double log_tail = n_tail > 0.0 ? log(n_tail) + log_mu : -INFINITY;

  // 4. normalizer and weights.
  int64_t arg = 0;
  for (int64_t i = 1; i < k; ++i) arg = kept[i] > kept[arg] ? i : arg;
  double m = fmax(log_tail, kept[arg] * inv_tau);
  if (!in_topk) m = fmax(m, e_x * inv_tau);
  double sum = exp(log_tail - m) + (in_topk ? 0.0 : exp(e_x * inv_tau - m));
  for (int64_t i = 0; i < k; ++i) sum += exp(kept[i] * inv_tau - m);
  const double log_z = m + log(sum);
  bool any = false;
  for (int64_t i = 0; i < k; ++i) {
    weights[i] = float(exp(kept[i] * inv_tau - log_z));
    any = any || weights[i] > 0.0f;
  }
  if (!any) {
    for (int64_t i = 0; i < k; ++i) weights[i] = i == arg ? 1.0f : 0.0f;
  }

  // 5. ids; x takes the last slot if in_topk.
  draw_ranks(seed, offset, stream, k, vocab_size, x, map, ids);
  const int64_t rank0 = ids[0];
  if (in_topk) ids[k - 1] = x;

  // 7. the discrete latent.
  const bool x_wins = zt_rule == kExact ? e_x > o_1 : in_topk;
  return {x_wins ? x : rank0, in_topk};
}

}  // namespace topk
}  // namespace duo_fast
