// CPU fast path of the Duo++ top-k row (docs/math.md §2e; the math, the random layout and
// the reference row are topk::token in duo_fast/curriculum_topk.h, which the CUDA kernel
// uses). Same Philox words, same ids, same z; weights within ~1e-9 relative of
// topk::token (which is itself within 3e-8 of exact by its refine rule).
//
// Per token, the k slots are processed in SoA loops that GCC vectorizes:
//   1. Philox4x32-10 blocks offset+1 .. offset+2H (H = ceil(k/2)), 4 (AVX2) or
//      2 (SSE2) blocks per vector, 4 vectors interleaved; each block gives two
//      64-bit words, so slot i's uniform is word i and its Fisher-Yates word is
//      word 2H + i (exactly draw_uniforms / draw_ranks' words).
//   2. t_i = log(U_i) / (N' - i) (fdlibm log, < 1 ulp), log V_i = cumsum (scalar,
//      in order), q_i = 1 - V_i = -expm1(log V_i) (Taylor on |r| <= ln2/2).
//   3. Phi^-1 by Wichura's AS241 (relative ~1e-16, log and sqrt only, no erfc),
//      run by run over the (monotone) classes of q: central, tail, far tail.
//   4. e_i = exp(kept_i / tau - m) once; w_i = e_i / sum.
//   5. ids: the Fisher-Yates indices from the words, then the swap map (scalar).
// xi, e_x, a~, s~ are computed by the baseline-compiled caller with curriculum_topk.h's own
// functions, so they are bit-identical (an FMA clone would contract a~ + s~ xi).
//
// Exactness of ids and z: they depend on the float math only through the
// comparisons e_x > o_k (in_topk) and e_x > o_1 (exact zt rule). topk::token's
// o_i differ from ours by Acklam's error (<= 1.15e-9 |Phi^-1|, when unrefined)
// plus the rounding of its log/expm1 chain; whenever e_x is within a band that
// covers those (band()) of o_k or o_1, or anything is unusual (non-finite
// values, log V_k < -36 where 1 - V rounds to 1, a largest weight near float's
// underflow where the "all zero -> one-hot" rule could flip), the token is
// recomputed by topk::token itself. That happens with probability ~1e-8 a token.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "duo_fast/curriculum_topk.h"
#include "isa.h"

namespace duo_fast {
namespace topk_cpu {

using topk::kExact;
using topk::Scales;
using topk::SwapMap;
using topk::TokenOut;

// ---- Philox4x32-10, several blocks at once --------------------------------
// Counter words live in the low 32 bits of 64-bit lanes; the high halves carry
// garbage that _mul_epu32 ignores and the final packing masks off.
// words[2b + e] = (v[2e] << 32) | v[2e + 1] of block `pos0 + b`, b < n.

constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

inline void philox_words_scalar(uint64_t seed, uint64_t stream, uint64_t pos0, int64_t n, uint64_t* words) {
  for (int64_t b = 0; b < n; ++b) {
    const Philox4x32 r = philox_block(seed, stream, pos0 + uint64_t(b));
    words[2 * b] = (uint64_t(r.v[0]) << 32) | r.v[1];
    words[2 * b + 1] = (uint64_t(r.v[2]) << 32) | r.v[3];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
constexpr int kPhiloxIlp = 4;  // independent vectors in flight (mul latency)

inline void philox_words_sse2(uint64_t seed, uint64_t stream, uint64_t pos0, int64_t n, uint64_t* words) {
  constexpr int L = 2, B = L * kPhiloxIlp;
  const __m128i mask = _mm_set1_epi64x(0xffffffffll);
  const __m128i m0 = _mm_set1_epi64x(kM0), m1 = _mm_set1_epi64x(kM1);
  const __m128i s0 = _mm_set1_epi64x(int64_t(uint32_t(stream))), s1 = _mm_set1_epi64x(int64_t(stream >> 32));
  __m128i key0[10], key1[10];
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r, k0 += kW0, k1 += kW1) {
    key0[r] = _mm_set1_epi64x(k0);
    key1[r] = _mm_set1_epi64x(k1);
  }
  int64_t b0 = 0;
  for (; b0 + B <= n; b0 += B) {
    __m128i c0[kPhiloxIlp], c1[kPhiloxIlp], c2[kPhiloxIlp], c3[kPhiloxIlp];
    for (int v = 0; v < kPhiloxIlp; ++v) {
      const uint64_t p = pos0 + uint64_t(b0 + v * L);
      const __m128i pos = _mm_set_epi64x(int64_t(p + 1), int64_t(p));
      c0[v] = s0;
      c1[v] = s1;
      c2[v] = pos;
      c3[v] = _mm_srli_epi64(pos, 32);
    }
    for (int r = 0; r < 10; ++r) {
      for (int v = 0; v < kPhiloxIlp; ++v) {
        const __m128i p0 = _mm_mul_epu32(c0[v], m0), p1 = _mm_mul_epu32(c2[v], m1);
        const __m128i n0 = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(p1, 32), c1[v]), key0[r]);
        const __m128i n2 = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(p0, 32), c3[v]), key1[r]);
        c0[v] = n0;
        c1[v] = p1;
        c2[v] = n2;
        c3[v] = p0;
      }
    }
    for (int v = 0; v < kPhiloxIlp; ++v) {
      const __m128i r0 = _mm_or_si128(_mm_slli_epi64(c0[v], 32), _mm_and_si128(c1[v], mask));
      const __m128i r1 = _mm_or_si128(_mm_slli_epi64(c2[v], 32), _mm_and_si128(c3[v], mask));
      uint64_t* out = words + 2 * (b0 + v * L);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_unpacklo_epi64(r0, r1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 2), _mm_unpackhi_epi64(r0, r1));
    }
  }
  philox_words_scalar(seed, stream, pos0 + uint64_t(b0), n - b0, words + 2 * b0);
}

[[gnu::target("avx2")]] inline void philox_words_avx2(uint64_t seed, uint64_t stream, uint64_t pos0, int64_t n,
                                                     uint64_t* words) {
  constexpr int L = 4, B = L * kPhiloxIlp;
  const __m256i mask = _mm256_set1_epi64x(0xffffffffll);
  const __m256i m0 = _mm256_set1_epi64x(kM0), m1 = _mm256_set1_epi64x(kM1);
  const __m256i s0 = _mm256_set1_epi64x(int64_t(uint32_t(stream))), s1 = _mm256_set1_epi64x(int64_t(stream >> 32));
  __m256i key0[10], key1[10];
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int r = 0; r < 10; ++r, k0 += kW0, k1 += kW1) {
    key0[r] = _mm256_set1_epi64x(k0);
    key1[r] = _mm256_set1_epi64x(k1);
  }
  int64_t b0 = 0;
  for (; b0 + B <= n; b0 += B) {
    __m256i c0[kPhiloxIlp], c1[kPhiloxIlp], c2[kPhiloxIlp], c3[kPhiloxIlp];
    for (int v = 0; v < kPhiloxIlp; ++v) {
      const uint64_t p = pos0 + uint64_t(b0 + v * L);
      const __m256i pos = _mm256_set_epi64x(int64_t(p + 3), int64_t(p + 2), int64_t(p + 1), int64_t(p));
      c0[v] = s0;
      c1[v] = s1;
      c2[v] = pos;
      c3[v] = _mm256_srli_epi64(pos, 32);
    }
    for (int r = 0; r < 10; ++r) {
      for (int v = 0; v < kPhiloxIlp; ++v) {
        const __m256i p0 = _mm256_mul_epu32(c0[v], m0), p1 = _mm256_mul_epu32(c2[v], m1);
        const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p1, 32), c1[v]), key0[r]);
        const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(p0, 32), c3[v]), key1[r]);
        c0[v] = n0;
        c1[v] = p1;
        c2[v] = n2;
        c3[v] = p0;
      }
    }
    for (int v = 0; v < kPhiloxIlp; ++v) {
      const __m256i r0 = _mm256_or_si256(_mm256_slli_epi64(c0[v], 32), _mm256_and_si256(c1[v], mask));
      const __m256i r1 = _mm256_or_si256(_mm256_slli_epi64(c2[v], 32), _mm256_and_si256(c3[v], mask));
      const __m256i lo = _mm256_unpacklo_epi64(r0, r1), hi = _mm256_unpackhi_epi64(r0, r1);  // (b0 b2), (b1 b3)
      uint64_t* out = words + 2 * (b0 + v * L);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute2x128_si256(lo, hi, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 4), _mm256_permute2x128_si256(lo, hi, 0x31));
    }
  }
  philox_words_sse2(seed, stream, pos0 + uint64_t(b0), n - b0, words + 2 * b0);
}
#endif

// ---- float64 math for vectorized loops --------------------------------------
// Plain arithmetic and 64-bit integer bit tricks only (no libm, no int64 <->
// double conversions, no arithmetic 64-bit shifts, no 64-bit compares), so both
// SSE2 and AVX2 vectorize them. Arguments are finite (callers screen).

[[gnu::always_inline]] inline double bits_d(uint64_t u) { return std::bit_cast<double>(u); }
[[gnu::always_inline]] inline uint64_t d_bits(double d) { return std::bit_cast<uint64_t>(d); }
// d < 0 (sign bit set) ? a : b through the bits: GCC turns a double select with
// computed or constant arms into a branch, and SSE2 has no double-compare ->
// 64-bit-mask pattern, so the condition is the sign of a difference.
[[gnu::always_inline]] inline double select_neg(double d, double a, double b) {
  const uint64_t m = uint64_t(0) - (d_bits(d) >> 63);
  return bits_d((d_bits(a) & m) | (d_bits(b) & ~m));
}

constexpr double kLn2Hi = 6.93147180369123816490e-01;  // fdlibm: low 32 bits zero
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kLog2e = 1.44269504088896338700e+00;
constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52

// log(x), x > 0 normal: x = 2^e (1 + f), sqrt(1/2) <= 1 + f < sqrt(2) (f exact),
// fdlibm's e_log.c core (error < 1 ulp).
[[gnu::always_inline]] inline double log_pos(double x) {
  const uint64_t ix = d_bits(x) + (0x3ff0000000000000ull - 0x3fe6a09e667f3bcdull);
  const double e = bits_d((ix >> 52) | 0x4330000000000000ull) - (4503599627370496.0 + 1023.0);
  const double f = bits_d((ix & 0x000fffffffffffffull) + 0x3fe6a09e667f3bcdull) - 1.0;
  const double s = f / (2.0 + f), z = s * s, w = z * z;
  const double t1 = w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
  const double t2 = z * (6.666666666666735130e-01 +
                         w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
  const double R = t2 + t1, hfsq = 0.5 * f * f;
  return e * kLn2Hi - ((hfsq - (s * (hfsq + R) + e * kLn2Lo)) - f);
}

// expm1(r) for |r| <= ln2/2 + tiny: Taylor to r^13 (truncation < 2e-17 relative).
[[gnu::always_inline]] inline double expm1_small(double r) {
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  return r + (r * r) * p;
}

// 2^kd r-reduction: y = kd ln2 + r, kd = round(y / ln2) (|y| < 2^20).
struct Reduced {
  double r, scale;  // scale = 2^kd (kd >= -1022)
};
[[gnu::always_inline]] inline Reduced reduce(double y) {
  const double t = y * kLog2e + kRound;
  const double kd = t - kRound;
  const double r = (y - kd * kLn2Hi) - kd * kLn2Lo;
  return {r, bits_d((d_bits(t) + 1023) << 52)};
}

// -expm1(y) = 1 - e^y for y <= 0 (y >= -100 after clamping: below, 1 - e^y rounds to 1).
[[gnu::always_inline]] inline double one_minus_exp(double y) {
  y = select_neg(y + 100.0, -100.0, y);
  const Reduced a = reduce(y);
  const double p = expm1_small(a.r);
  return (1.0 - a.scale) - a.scale * p;  // kd = 0: exactly -p
}

// e^d, d <= ~0 finite (clamped at -708: 2^kd stays normal; the weights flush to 0 there anyway).
[[gnu::always_inline]] inline double exp_neg(double d) {
  d = select_neg(d + 708.0, -708.0, d);
  const Reduced a = reduce(d);
  return a.scale + a.scale * expm1_small(a.r);
}

// sqrt(y) for y in [0.5, 1e3] without libm (GCC keeps sqrt scalar under
// -fmath-errno): 1/sqrt by the bit trick and 4 Newton steps (3.4% -> ~1e-17),
// then one Newton correction of y / sqrt(y) (< 1 ulp).
[[gnu::always_inline]] inline double sqrt_mid(double y) {
  double x = bits_d(0x5fe6eb50c7b537a9ull - (d_bits(y) >> 1));
  const double h = 0.5 * y;
  x = x * (1.5 - h * x * x);
  x = x * (1.5 - h * x * x);
  x = x * (1.5 - h * x * x);
  x = x * (1.5 - h * x * x);
  const double s = y * x;
  return s + (0.5 * x) * (y - s * s);
}

// Wichura's AS241 (PPND16), relative accuracy ~1e-16.
// Central: |q - 1/2| <= 0.425, Phi^-1(q) = qm A(r) / B(r), qm = q - 1/2, r = 0.180625 - qm^2.
[[gnu::always_inline]] inline double ppnd_central(double q) {
  const double qm = q - 0.5, r = 0.180625 - qm * qm;
  const double a = (((((((2.5090809287301226727e+3 * r + 3.3430575583588128105e+4) * r + 6.7265770927008700853e+4) * r +
                        4.5921953931549871457e+4) * r + 1.3731693765509461125e+4) * r + 1.9715909503065514427e+3) * r +
                     1.3314166789178437745e+2) * r + 3.3871328727963666080e+0);
  const double b = (((((((5.2264952788528545610e+3 * r + 2.8729085735721942674e+4) * r + 3.9307895800092710610e+4) * r +
                        2.1213794301586595867e+4) * r + 5.3941960214247511077e+3) * r + 6.8718700749205790830e+2) * r +
                     4.2313330701600911252e+1) * r + 1.0);
  return qm * a / b;
}
// Tails with sqrt(-log(min(q, 1 - q))) <= 5: rational in r - 1.6, sign of q - 1/2.
[[gnu::always_inline]] inline double ppnd_tail(double q) {
  const double up = 0.5 - q;                        // < 0: the lower tail of Phi^-1 (q > 1/2)
  const double qq = select_neg(up, 1.0 - q, q);  // exact for q > 1/2 (Sterbenz)
  const double r = sqrt_mid(-log_pos(qq)) - 1.6;
  const double c = (((((((7.74545014278341407640e-4 * r + 2.27238449892691845833e-2) * r + 2.41780725177450611770e-1) * r +
                        1.27045825245236838258e+0) * r + 3.64784832476320460504e+0) * r + 5.76949722146069140550e+0) * r +
                     4.63033784615654529590e+0) * r + 1.42343711074968357734e+0);
  const double d = (((((((1.05075007164441684324e-9 * r + 5.47593808499534494600e-4) * r + 1.51986665636164571966e-2) * r +
                        1.48103976427480074590e-1) * r + 6.89767334985100004550e-1) * r + 1.67638483018380384940e+0) * r +
                     2.05319162663775882187e+0) * r + 1.0);
  const double v = c / d;
  return select_neg(up, v, -v);
}
// Far tails (r > 5, min(q, 1 - q) < e^-25): scalar, rare.
inline double ppnd_far(double q) {
  const bool upper = q > 0.5;
  const double qq = upper ? 1.0 - q : q;
  if (!(qq > 0.0)) return upper ? INFINITY : (qq == 0.0 ? -INFINITY : NAN);
  const double r = std::sqrt(-std::log(qq)) - 5.0;
  const double e = (((((((2.01033439929228813265e-7 * r + 2.71155556874348757815e-5) * r + 1.24266094738807843860e-3) * r +
                        2.65321895265761230930e-2) * r + 2.96560571828504891230e-1) * r + 1.78482653991729133580e+0) * r +
                     5.46378491116411436990e+0) * r + 6.65790464350110377720e+0);
  const double f = (((((((2.04426310338993978564e-15 * r + 1.42151175831644588870e-7) * r + 1.84631831751005468180e-5) * r +
                        7.86869131145613259100e-4) * r + 1.48753612908506148525e-2) * r + 1.36929880922735805310e-1) * r +
                     5.99832206555887937690e-1) * r + 1.0);
  const double v = e / f;
  return upper ? v : -v;
}

constexpr double kFarQ = 1.3887943864964021e-11;  // e^-25: AS241's r = 5
inline int ppnd_class(double q) {
  if (std::fabs(q - 0.5) <= 0.425) return 0;
  const double qq = q > 0.5 ? 1.0 - q : q;
  return qq >= kFarQ ? 1 : 2;
}

// ---- the row ------------------------------------------------------------------

// Per-thread scratch for k slots.
struct Scratch {
  uint64_t* words;  // 4 * ceil(k/2)
  double* a;        // k: t_i, then log V_i, then q_i
  double* kept;     // k
  double* e;        // k
  // Optional dense swap table for Fisher-Yates: perm[p] = value at position p, or
  // -1 for "p itself"; N' entries, all -1 on entry and on return (touched[k]
  // lists what to reset). nullptr: the hash SwapMap (any vocabulary size).
  int32_t* perm;
  int32_t* touched;
};
// Vocabularies up to this many others use the dense table (4 bytes an entry a thread).
constexpr int64_t kDenseMaxOthers = int64_t(1) << 20;
inline int64_t scratch_words(int64_t k) { return 4 * ((k + 1) / 2); }

// |o_ours - o_topk::token| bound, in units of s~ (see the header comment):
// Acklam's 1.15e-9 relative (x2.6 margin), rounding of the log/expm1 chain
// (relative ~1e-13, absolute near Phi^-1 = 0), and in the lower tail one ulp of
// q = 1 - V (absolute 1.1e-16 in V) times dPhi^-1/dV = 1/phi(x).
inline double band(double o, double s) {
  if (!(s > 0.0)) return 0.0;  // s~ = 0 (|gamma| > 745): every o is 0, e_x = a~ exactly
  const double phi = o / s;
  double b = 3e-9 * std::fabs(phi) + 1e-12;
  if (phi < -3.0) b += 1e-15 * std::exp(0.5 * phi * phi + kLogSqrt2Pi);
  return s * b;
}

struct Prologue {
  Scales sc;
  double e_x;
};

// The fast row. Returns false (and writes nothing the caller keeps, `map` still
// empty) where topk::token must decide; else writes ids/weights and *out.
template <bool kAvx2>
[[gnu::always_inline]] inline bool token_impl(uint64_t seed, uint64_t offset, uint64_t stream, int64_t x,
                                              const Prologue& pr, double inv_tau, int64_t k, int64_t vocab_size,
                                              int zt_rule, SwapMap map, int64_t* ids, float* weights, Scratch sc,
                                              TokenOut* out) {
  const int64_t H = (k + 1) / 2;
  const double s = pr.sc.s, n_others = double(vocab_size - 1);
  uint64_t* words = sc.words;
  double* a = sc.a;
  double* kept = sc.kept;
  double* e = sc.e;

  // 1. Philox blocks offset+1 .. offset+2H.
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (kAvx2)
    philox_words_avx2(seed, stream, offset + 1, 2 * H, words);
  else
    philox_words_sse2(seed, stream, offset + 1, 2 * H, words);
#else
  philox_words_scalar(seed, stream, offset + 1, 2 * H, words);
#endif

  // 2. t_i = log(U_i) / (N' - i); log V = cumsum; q = 1 - V.
  const int32_t k32 = int32_t(k);  // k < 2^24: int32 -> double converts vector-wise, int64 does not
#pragma omp simd
  for (int32_t i = 0; i < k32; ++i) {
    const uint64_t w = words[i] >> 11;  // uniform53: (w + 1/2) 2^-53, w < 2^53 (exact as a double)
    const double wd = bits_d((w >> 32) | 0x4330000000000000ull) - 4503599627370496.0;
    const double wl = bits_d((w & 0xffffffffull) | 0x4330000000000000ull) - 4503599627370496.0;
    double u = (wd * 4294967296.0 + wl + 0.5) * 0x1.0p-53;
    u = select_neg(u - 0x1.fffffffffffffp-1, u, 0x1.fffffffffffffp-1);
    a[i] = log_pos(u) / (n_others - double(i));
  }
  double log_v = 0.0;
  for (int64_t i = 0; i < k; ++i) a[i] = log_v += a[i];
  if (!(log_v >= -36.0)) return false;  // 1 - V within an ulp of 1 (or NaN): topk::token's own rounding decides
#pragma omp simd
  for (int64_t i = 0; i < k; ++i) a[i] = one_minus_exp(a[i]);

  // 3. kept_i = s~ Phi^-1(V_i) = -s~ Phi^-1(q_i), run by run over q's classes.
  for (int64_t i = 0; i < k;) {
    const int c = ppnd_class(a[i]);
    int64_t j = i + 1;
    while (j < k && ppnd_class(a[j]) == c) ++j;
    if (c == 0) {
#pragma omp simd
      for (int64_t l = i; l < j; ++l) kept[l] = -s * ppnd_central(a[l]);
    } else if (c == 1) {
#pragma omp simd
      for (int64_t l = i; l < j; ++l) kept[l] = -s * ppnd_tail(a[l]);
    } else {
      for (int64_t l = i; l < j; ++l) kept[l] = -s * ppnd_far(a[l]);
    }
    i = j;
  }
  const double o_1 = kept[0], o_k = kept[k - 1];
  if (!(std::fabs(o_1) < INFINITY && std::fabs(o_k) < INFINITY)) return false;

  // 4. the x-entry and the decisions ids / z depend on, away from topk::token's rounding.
  const double e_x = pr.e_x;
  if (std::fabs(e_x - o_k) <= band(o_k, s)) return false;
  if (zt_rule == kExact && std::fabs(e_x - o_1) <= band(o_1, s)) return false;
  const bool in_topk = e_x > o_k;
  const double c = in_topk ? (k >= 2 ? kept[k - 2] : INFINITY) : o_k;
  const double n_tail = double(in_topk ? vocab_size - k : vocab_size - k - 1);
  if (in_topk) kept[k - 1] = e_x;

  // tail mass (scalar, as topk::token).
  const double S = s * inv_tau, ct = c * inv_tau;
  const double log_mu = 0.5 * S * S + log_ndtr((ct - S * S) / S) - log_ndtr(ct / S);
  const double log_tail = n_tail > 0.0 ? log(n_tail) + log_mu : -INFINITY;

  // 5. weights: e_i = exp(kept_i / tau - m) once, w_i = e_i / sum.
  double mx = kept[0], ksum = 0.0;
#pragma omp simd reduction(max : mx) reduction(+ : ksum)
  for (int64_t i = 0; i < k; ++i) {
    mx = kept[i] > mx ? kept[i] : mx;
    ksum += kept[i];
  }
  if (!(std::fabs(ksum) < INFINITY)) return false;
  double m = std::fmax(log_tail, mx * inv_tau);
  if (!in_topk) m = std::fmax(m, e_x * inv_tau);
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < k; ++i) {
    e[i] = exp_neg(kept[i] * inv_tau - m);
    sum += e[i];
  }
  sum += std::exp(log_tail - m) + (in_topk ? 0.0 : std::exp(e_x * inv_tau - m));
  const double inv = 1.0 / sum;
  // topk::token's "all weights zero -> one-hot on the largest kept entry": the
  // largest weight near float's underflow could go either way, so topk::token
  // decides there. Clearly zero only happens for k = 1 with the x-entry in (c =
  // +inf, the tail is n e^{S^2/2}): the one-hot is then weights[0] = 1; for k >= 2
  // the tail is below n e^{c/tau} and the largest weight >= 1/K (never zero), so
  // that case is left to topk::token too.
  const double w_max = exp_neg(mx * inv_tau - m) * inv;
  if (w_max > 0x1.0p-148) {
#pragma omp simd
    for (int64_t i = 0; i < k; ++i) weights[i] = float(e[i] * inv);
  } else if (k == 1 && w_max < 0x1.0p-152) {
    weights[0] = 1.0f;
  } else {
    return false;
  }

  // 6. ids (draw_ranks on the same words): step i swaps i with i + U[0, N' - i).
  const uint32_t n = uint32_t(vocab_size - 1);
  const uint64_t* fy = words + 2 * H;
  if (sc.perm) {
    // Dense table, branch-free: setting position j when j == pos is harmless (pos is never read again).
    int32_t* perm = sc.perm;
    for (int64_t i = 0; i < k; ++i) {
      const int32_t pos = int32_t(i);
      const int32_t j = pos + int32_t(uniform_index(uint32_t(fy[i] >> 32), uint32_t(fy[i]), n - uint32_t(pos)));
      const int32_t pj = perm[j], pp = perm[pos];
      const int32_t vj = pj < 0 ? j : pj;
      perm[j] = pp < 0 ? pos : pp;
      sc.touched[i] = j;
      ids[i] = int64_t(vj) + (int64_t(vj) >= x ? 1 : 0);
    }
    for (int64_t i = 0; i < k; ++i) perm[sc.touched[i]] = -1;
  } else {
    for (int64_t i = 0; i < k; ++i) {
      const int32_t pos = int32_t(i);
      const int32_t j = pos + int32_t(uniform_index(uint32_t(fy[i] >> 32), uint32_t(fy[i]), n - uint32_t(pos)));
      const int32_t vj = map.get(j);
      if (j != pos) map.set(j, map.get(pos));
      ids[i] = int64_t(vj) + (int64_t(vj) >= x ? 1 : 0);
    }
  }
  const int64_t rank0 = ids[0];
  if (in_topk) ids[k - 1] = x;
  const bool x_wins = zt_rule == kExact ? e_x > o_1 : in_topk;
  *out = {x_wins ? x : rank0, in_topk};
  return true;
}

#if defined(__x86_64__) && defined(__GNUC__)
[[gnu::target("avx2,fma")]] inline bool token_avx2(uint64_t seed, uint64_t offset, uint64_t stream, int64_t x,
                                                   const Prologue& pr, double inv_tau, int64_t k, int64_t vocab_size,
                                                   int zt_rule, SwapMap map, int64_t* ids, float* weights, Scratch sc,
                                                   TokenOut* out) {
  return token_impl<true>(seed, offset, stream, x, pr, inv_tau, k, vocab_size, zt_rule, map, ids, weights, sc, out);
}
#endif
inline bool token_base(uint64_t seed, uint64_t offset, uint64_t stream, int64_t x, const Prologue& pr, double inv_tau,
                       int64_t k, int64_t vocab_size, int zt_rule, SwapMap map, int64_t* ids, float* weights,
                       Scratch sc, TokenOut* out) {
  return token_impl<false>(seed, offset, stream, x, pr, inv_tau, k, vocab_size, zt_rule, map, ids, weights, sc, out);
}

// Drop-in for topk::token on the CPU (same arguments plus the scratch; `map`
// must be empty; it is left dirty if the hash map was used, i.e. unless
// sc.perm is set and the fast path ran). *fast (optional) reports which path ran.
// isa: -1 auto, 0 baseline, 1 AVX2 (tests).
inline TokenOut token(uint64_t seed, uint64_t offset, uint64_t stream, int64_t x, double gamma, double inv_tau,
                      int64_t k, int64_t vocab_size, int zt_rule, SwapMap map, int64_t* ids, float* weights,
                      Scratch sc, bool* fast = nullptr, int isa = -1) {
  // Baseline-compiled prologue: bit-identical to topk::token's.
  Prologue pr;
  pr.sc = topk::scales(gamma);
  pr.e_x = pr.sc.a + pr.sc.s * topk::draw_xi(seed, offset, stream);
  TokenOut o;
  bool ok;
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == 1 || (isa < 0 && have_avx2_fma()))
    ok = token_avx2(seed, offset, stream, x, pr, inv_tau, k, vocab_size, zt_rule, map, ids, weights, sc, &o);
  else
#endif
    ok = token_base(seed, offset, stream, x, pr, inv_tau, k, vocab_size, zt_rule, map, ids, weights, sc, &o);
  if (fast) *fast = ok;
  if (ok) return o;
  return topk::token(seed, offset, stream, x, gamma, inv_tau, k, vocab_size, zt_rule, map, ids, weights, sc.kept);
}

}  // namespace topk_cpu
}  // namespace duo_fast
