// Row kernels of the CPU curriculum_embed (exact curriculum input, docs/math.md §2c, §2d;
// math in duo_fast/curriculum_embed.h), free of ATen so a standalone harness can run
// them: for one token and one tile of the vocabulary, the noise eps (the
// shared Box-Muller functions of curriculum_embed.h in loops GCC vectorizes), the
// tile's maximum, and the tile's row of P = exp(y - ref).
//
// Noise of a tile: Philox4x32-10 of the tile's blocks with SIMD intrinsics
// (integer arithmetic: the same words as philox_block by construction), then
// Box-Muller by the scalar functions of curriculum_embed.h in a loop GCC vectorizes
// and an sqrtps pass. Neither x86-64 variant forms FMAs in the noise (the AVX2
// one is compiled for "avx2" alone) and sqrt is correctly rounded, so eps is
// bit-identical to curriculum::noise4 (the test hook's eps) on any x86-64 CPU.
//
// Scores of the tile: y_j = c eps_j (c = s~/tau) except at x. With eref = the
// tile's largest eps (x excluded) and yref = its score (double), the exponent
// y_j - M (M = the running max, or the log-sum-exp in the backward) is formed
// as c (eps_j - eref) + (yref - M): eps_j - eref is exact or rounded relative to
// itself, so the exponent carries a relative error ~1e-7 (the original float
// (y_j - M) has the same), never the absolute 1e-3 of a float c eps_j at 1/tau = 1e4.
//
// Both x86-64 variants are compiled from the same source: AVX2 (+ FMA for the
// exp pass) chosen at run time, else the SSE2 baseline.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DUO_CURRICULUM_X86 1
#endif

#include "duo_fast/curriculum_embed.h"
#include "duo_fast/fast_math.h"
#include "isa.h"

namespace duo_fast {
namespace curriculum_cpu {

// Entries of the vocabulary per tile (the forward's GEMM depth, the backward's
// dE rows per task); a multiple of 8.
constexpr int64_t kVocabTile = 512;

// Per-thread scratch of one tile's noise: the Philox words of block i at
// w[k][i], the Box-Muller pairs p = 0, 1 of block i at t[p][i] (-2 log u1),
// c[p][i], s[p][i] (cos, sin), and the tile's eps (eps[4 i + 2 p + {0, 1}]).
struct NoiseScratch {
  static constexpr int64_t kBlocks = kVocabTile / curriculum::kNoisePerBlock;
  alignas(64) uint32_t w[4][kBlocks + 8];
  alignas(64) float t[2][kBlocks + 8];
  alignas(64) float c[2][kBlocks + 8];
  alignas(64) float s[2][kBlocks + 8];
  alignas(64) float eps[kVocabTile + 32];
};

// Philox4x32-10 (philox.h) of blocks base .. base + nb - 1 of stream `token`
// into sc.w, rounded up to whole vectors (w has room). The 32x32 -> 64-bit
// products are pmuludq on 64-bit lanes, each lane one block (GCC's own
// vectorization of philox4x32_10 spends most of its time on shuffles between
// 32- and 64-bit lane layouts, or expands the constant 64-bit products into
// shifts); two chains take the even and the odd blocks, so one blend puts the
// low words back in block order. Only the low 32 bits of each 64-bit lane are
// the Philox word (pmuludq reads only those).
#if defined(DUO_CURRICULUM_X86)
[[gnu::target("avx2")]] inline void philox_words_avx2(uint64_t seed, uint64_t base, uint64_t token, int64_t nb,
                                                      NoiseScratch& sc) {
  __m256i key0[10], key1[10];
  for (int r = 0; r < 10; ++r) {
    key0[r] = _mm256_set1_epi64x(int64_t(uint32_t(seed) + uint32_t(r) * 0x9E3779B9u));
    key1[r] = _mm256_set1_epi64x(int64_t(uint32_t(seed >> 32) + uint32_t(r) * 0xBB67AE85u));
  }
  const __m256i m0 = _mm256_set1_epi64x(0xD2511F53), m1 = _mm256_set1_epi64x(0xCD9E8D57);
  const __m256i s0 = _mm256_set1_epi64x(int64_t(uint32_t(token))), s1 = _mm256_set1_epi64x(int64_t(token >> 32));
  for (int64_t i = 0; i < nb; i += 8) {
    const uint64_t p = base + uint64_t(i);
    const __m256i pa = _mm256_set_epi64x(int64_t(p + 6), int64_t(p + 4), int64_t(p + 2), int64_t(p));
    const __m256i pb = _mm256_set_epi64x(int64_t(p + 7), int64_t(p + 5), int64_t(p + 3), int64_t(p + 1));
    __m256i a0 = s0, a1 = s1, a2 = pa, a3 = _mm256_srli_epi64(pa, 32);
    __m256i b0 = s0, b1 = s1, b2 = pb, b3 = _mm256_srli_epi64(pb, 32);
    for (int r = 0; r < 10; ++r) {
      const __m256i pa0 = _mm256_mul_epu32(a0, m0), pa1 = _mm256_mul_epu32(a2, m1);
      const __m256i pb0 = _mm256_mul_epu32(b0, m0), pb1 = _mm256_mul_epu32(b2, m1);
      a0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa1, 32), a1), key0[r]);
      a2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa0, 32), a3), key1[r]);
      a1 = pa1;
      a3 = pa0;
      b0 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb1, 32), b1), key0[r]);
      b2 = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb0, 32), b3), key1[r]);
      b1 = pb1;
      b3 = pb0;
    }
    _mm256_store_si256(reinterpret_cast<__m256i*>(sc.w[0] + i), _mm256_blend_epi32(a0, _mm256_slli_epi64(b0, 32), 0xAA));
    _mm256_store_si256(reinterpret_cast<__m256i*>(sc.w[1] + i), _mm256_blend_epi32(a1, _mm256_slli_epi64(b1, 32), 0xAA));
    _mm256_store_si256(reinterpret_cast<__m256i*>(sc.w[2] + i), _mm256_blend_epi32(a2, _mm256_slli_epi64(b2, 32), 0xAA));
    _mm256_store_si256(reinterpret_cast<__m256i*>(sc.w[3] + i), _mm256_blend_epi32(a3, _mm256_slli_epi64(b3, 32), 0xAA));
  }
}

inline void philox_words_sse2(uint64_t seed, uint64_t base, uint64_t token, int64_t nb, NoiseScratch& sc) {
  __m128i key0[10], key1[10];
  for (int r = 0; r < 10; ++r) {
    key0[r] = _mm_set1_epi64x(int64_t(uint32_t(seed) + uint32_t(r) * 0x9E3779B9u));
    key1[r] = _mm_set1_epi64x(int64_t(uint32_t(seed >> 32) + uint32_t(r) * 0xBB67AE85u));
  }
  const __m128i m0 = _mm_set1_epi64x(0xD2511F53), m1 = _mm_set1_epi64x(0xCD9E8D57);
  const __m128i s0 = _mm_set1_epi64x(int64_t(uint32_t(token))), s1 = _mm_set1_epi64x(int64_t(token >> 32));
  const __m128i lo = _mm_set1_epi64x(0xffffffff);
  for (int64_t i = 0; i < nb; i += 4) {
    const uint64_t p = base + uint64_t(i);
    const __m128i pa = _mm_set_epi64x(int64_t(p + 2), int64_t(p)), pb = _mm_set_epi64x(int64_t(p + 3), int64_t(p + 1));
    __m128i a0 = s0, a1 = s1, a2 = pa, a3 = _mm_srli_epi64(pa, 32);
    __m128i b0 = s0, b1 = s1, b2 = pb, b3 = _mm_srli_epi64(pb, 32);
    for (int r = 0; r < 10; ++r) {
      const __m128i pa0 = _mm_mul_epu32(a0, m0), pa1 = _mm_mul_epu32(a2, m1);
      const __m128i pb0 = _mm_mul_epu32(b0, m0), pb1 = _mm_mul_epu32(b2, m1);
      a0 = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(pa1, 32), a1), key0[r]);
      a2 = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(pa0, 32), a3), key1[r]);
      a1 = pa1;
      a3 = pa0;
      b0 = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(pb1, 32), b1), key0[r]);
      b2 = _mm_xor_si128(_mm_xor_si128(_mm_srli_epi64(pb0, 32), b3), key1[r]);
      b1 = pb1;
      b3 = pb0;
    }
    _mm_store_si128(reinterpret_cast<__m128i*>(sc.w[0] + i), _mm_or_si128(_mm_and_si128(a0, lo), _mm_slli_epi64(b0, 32)));
    _mm_store_si128(reinterpret_cast<__m128i*>(sc.w[1] + i), _mm_or_si128(_mm_and_si128(a1, lo), _mm_slli_epi64(b1, 32)));
    _mm_store_si128(reinterpret_cast<__m128i*>(sc.w[2] + i), _mm_or_si128(_mm_and_si128(a2, lo), _mm_slli_epi64(b2, 32)));
    _mm_store_si128(reinterpret_cast<__m128i*>(sc.w[3] + i), _mm_or_si128(_mm_and_si128(a3, lo), _mm_slli_epi64(b3, 32)));
  }
}
#endif

// Philox words on any other target: the shared scalar philox_block.
inline void philox_words_scalar(uint64_t seed, uint64_t base, uint64_t token, int64_t nb, NoiseScratch& sc) {
  for (int64_t i = 0; i < nb; ++i) {
    const Philox4x32 b = philox_block(seed, token, base + uint64_t(i));
    for (int k = 0; k < 4; ++k) sc.w[k][i] = b.v[k];
  }
}

// Box-Muller of sc.w[.][0 .. nb) into sc.eps[0 .. 4 nb): the scalar functions
// of curriculum_embed.h in a loop GCC vectorizes, then r = sqrt(t) (sqrtps: GCC does
// not vectorize sqrtf under -fmath-errno), r cos and r sin into block order.
[[gnu::always_inline]] inline void box_muller_impl(int64_t nb, NoiseScratch& sc) {
  const uint32_t* __restrict__ w0 = sc.w[0];
  const uint32_t* __restrict__ w1 = sc.w[1];
  const uint32_t* __restrict__ w2 = sc.w[2];
  const uint32_t* __restrict__ w3 = sc.w[3];
  float* __restrict__ t0 = sc.t[0];
  float* __restrict__ t1 = sc.t[1];
  float* __restrict__ c0 = sc.c[0];
  float* __restrict__ c1 = sc.c[1];
  float* __restrict__ s0 = sc.s[0];
  float* __restrict__ s1 = sc.s[1];
  for (int64_t i = 0; i < nb; ++i) {
    t0[i] = curriculum::minus_two_log(curriculum::radius_uniform(w0[i]));
    t1[i] = curriculum::minus_two_log(curriculum::radius_uniform(w2[i]));
    float cs, sn;
    curriculum::angle_cos_sin(w1[i], cs, sn);
    c0[i] = cs;
    s0[i] = sn;
    curriculum::angle_cos_sin(w3[i], cs, sn);
    c1[i] = cs;
    s1[i] = sn;
  }
  float* __restrict__ e = sc.eps;
  int64_t i = 0;
#if defined(DUO_CURRICULUM_X86)
  for (; i + 4 <= nb; i += 4) {
    const __m128 r0 = _mm_sqrt_ps(_mm_load_ps(t0 + i)), r1 = _mm_sqrt_ps(_mm_load_ps(t1 + i));
    __m128 a = _mm_mul_ps(r0, _mm_load_ps(c0 + i)), b = _mm_mul_ps(r0, _mm_load_ps(s0 + i));
    __m128 c = _mm_mul_ps(r1, _mm_load_ps(c1 + i)), d = _mm_mul_ps(r1, _mm_load_ps(s1 + i));
    _MM_TRANSPOSE4_PS(a, b, c, d);  // now block i + k's (eps0, eps1, eps2, eps3) in the k-th
    _mm_store_ps(e + 4 * i, a);
    _mm_store_ps(e + 4 * i + 4, b);
    _mm_store_ps(e + 4 * i + 8, c);
    _mm_store_ps(e + 4 * i + 12, d);
  }
#endif
  for (; i < nb; ++i) {
    const float r0 = std::sqrt(t0[i]), r1 = std::sqrt(t1[i]);
    e[4 * i] = r0 * c0[i];
    e[4 * i + 1] = r0 * s0[i];
    e[4 * i + 2] = r1 * c1[i];
    e[4 * i + 3] = r1 * s1[i];
  }
}

// Largest of e[0 .. n) (-inf when n = 0 or all are -inf).
[[gnu::always_inline]] inline float max_impl(const float* e, int64_t n) {
  float m = -INFINITY;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = e[j] > m ? e[j] : m;
  return m;
}

// The exponent c (e_j - eref) + delta of a tile, c and delta (double) each as
// a float pair hi + lo: the roundings of c and delta are common to the whole
// tile (a bias of the tile's sum, not an error that averages out), so they
// are carried to ~2^-48; what is left is the per-entry rounding (~1e-7
// relative to the exponent), as in the original float(y_j - max).
struct Exponent {
  float c_hi, c_lo, eref, d_hi, d_lo;
};

inline Exponent exponent(double c, float eref, double delta) {
  const float c_hi = float(c), d_hi = float(delta);
  return {c_hi, float(c - double(c_hi)), eref, d_hi, float(delta - double(d_hi))};
}

// p[j] = exp(c (e[j] - eref) + delta) for j in [0, n) (<= 0 for e[j] <= eref,
// -inf entries give 0); returns sum p[j] in double.
[[gnu::always_inline]] inline double exp_row_impl(const float* e, int64_t n, const Exponent& x, float* p) {
  const float c_hi = x.c_hi, c_lo = x.c_lo, eref = x.eref, d_hi = x.d_hi, d_lo = x.d_lo;
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float dj = e[j] - eref;
    const float v = fastmath::exp_nonpos((c_hi * dj + d_hi) + (c_lo * dj + d_lo));
    p[j] = v;
    sum += double(v);
  }
  return sum;
}

#if defined(DUO_CURRICULUM_X86) && defined(__GNUC__)
// The noise has no FMA in either variant (bit-identical eps): "avx2" alone.
[[gnu::target("avx2")]] inline void noise_tile_avx2(uint64_t seed, uint64_t offset, uint64_t token, int64_t b0,
                                                    int64_t nb, NoiseScratch& sc) {
  philox_words_avx2(seed, offset + uint64_t(b0), token, nb, sc);
  box_muller_impl(nb, sc);
}
inline void noise_tile_base(uint64_t seed, uint64_t offset, uint64_t token, int64_t b0, int64_t nb,
                            NoiseScratch& sc) {
  philox_words_sse2(seed, offset + uint64_t(b0), token, nb, sc);
  box_muller_impl(nb, sc);
}
[[gnu::target("avx2,fma")]] inline float max_avx2(const float* e, int64_t n) { return max_impl(e, n); }
inline float max_base(const float* e, int64_t n) { return max_impl(e, n); }
[[gnu::target("avx2,fma")]] inline double exp_row_avx2(const float* e, int64_t n, const Exponent& x, float* p) {
  return exp_row_impl(e, n, x, p);
}
inline double exp_row_base(const float* e, int64_t n, const Exponent& x, float* p) { return exp_row_impl(e, n, x, p); }
inline void noise_tile(uint64_t seed, uint64_t offset, uint64_t token, int64_t b0, int64_t nb, NoiseScratch& sc) {
  if (have_avx2_fma())
    noise_tile_avx2(seed, offset, token, b0, nb, sc);
  else
    noise_tile_base(seed, offset, token, b0, nb, sc);
}
inline float tile_max(const float* e, int64_t n) { return have_avx2_fma() ? max_avx2(e, n) : max_base(e, n); }
inline double exp_row(const float* e, int64_t n, const Exponent& x, float* p) {
  return have_avx2_fma() ? exp_row_avx2(e, n, x, p) : exp_row_base(e, n, x, p);
}
#else
inline void noise_tile(uint64_t seed, uint64_t offset, uint64_t token, int64_t b0, int64_t nb, NoiseScratch& sc) {
  philox_words_scalar(seed, offset + uint64_t(b0), token, nb, sc);
  box_muller_impl(nb, sc);
}
inline float tile_max(const float* e, int64_t n) { return max_impl(e, n); }
inline double exp_row(const float* e, int64_t n, const Exponent& x, float* p) { return exp_row_impl(e, n, x, p); }
#endif

}  // namespace curriculum_cpu
}  // namespace duo_fast
