// Row kernels of the CPU usdm_loss (math in duo_fast/usdm_loss.h), free of ATen
// so a standalone harness can run them.
//
// Float32 entry path (most rows): sweep 1 the max m, then e_j = exp(x_j - m)
// (float, fast_math.h) into a scratch row with se = sum e_j in double;
// p_j = e_j / se. Every sum is taken over these e_j and every p (p_x, p_z, p_b
// too) is e_j / se in double, so the p's the loss sees sum to 1 to double
// precision: float only enters as per-entry relative errors (~1e-7 in e_j and in
// log1p(r p_j)), which move the loss by ~1e-7 |dalpha| / (1 - alpha) at most (the
// first-order effect of a per-entry error in p_j cancels between S and D).
// u_j = r p_j = e_j R with R = r / se split into two floats (hi + lo), so R's
// rounding is not a common error on all p's. Sweep 2 sums, over j not in
// {x, z, b}, S = sum log1p(u_j), E = sum e_j and A = sum e_j (1 - q_j)
// (q_j = 1 / (1 + u_j); Q = A / (r se)) in double; sweep 3 recomputes u_j, q_j
// and writes grad_j = p_j F (C - p_j q_j) with the bracket in a form that does
// not cancel in float when r p_j >> 1 (see sweep2 and the gradient loop).
// The big entry b (p_b > 1/2) can only be the row's unique maximum: p_max = 1 / se.
//
// Float64 entry path (the original kernel): rows where float errors would stop
// being small against the tests' 1e-5 relative + 1e-6 absolute: 1 - alpha <
// kF32MinOneMinusAlpha (loss error ~1e-7 |dalpha| / (1 - alpha)), r < kF32MinR
// (the loss is ~|dalpha| r there, so the fixed float error becomes a large
// relative one), tiny vocabularies where speed does not matter, rows with NaN
// or +inf logits (keeps the original NaN results), and, with the gradient, rows
// with z == x0 whose gradient bracket C is positive (the clean token has almost
// no probability: the brackets cancel in float for near-flat rows).
//
// Both x86-64 variants of the float path are compiled from the same source:
// AVX2 + FMA (8 floats a vector) chosen at run time, else the SSE2 baseline.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "duo_fast/fast_math.h"
#include "duo_fast/logits.h"
#include "duo_fast/usdm_loss.h"
#include "isa.h"

namespace duo_fast {
namespace usdm_cpu {

using usdm::kF32MinOneMinusAlpha;  // the switch (usdm_loss.h), shared with the CUDA kernel
using usdm::kF32MinR;
using usdm::kF32MinVocab;
// e_j = exp(x_j - max) below 2^-80 (p_j < 1e-24) is taken as 0: their share of
// every sum is < K 2^-80, their gradient entries are ~p_j times the row's scale,
// and the floor keeps r p_j, e_j q_j, ... off float's subnormal range (an
// operation on a subnormal costs ~100 cycles on x86; scale-30 rows ran 35%
// slower without it).
constexpr int kExpMinK = -80;

// First j with x[j] == v (v is in x): blocks of 256 compared vector-wise.
template <class T>
[[gnu::always_inline]] inline int64_t find_first(const T* x, int64_t n, float v) {
  for (int64_t j0 = 0; j0 < n; j0 += 256) {
    const int64_t j1 = std::min(n, j0 + 256);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t j = j0; j < j1; ++j) hit |= int(to_float(x[j]) == v);
    if (hit)
      for (int64_t j = j0; j < j1; ++j)
        if (to_float(x[j]) == v) return j;
  }
  return -1;
}

// Inputs of a batch of rows. T: the logits' storage type (float, bf16_bits,
// f16_bits, logits.h), read natively (every entry becomes a float in
// registers); the gradient is written in the same type, each entry computed in
// float32 (float64 on the float64 path, then float32) and rounded once to T.
template <class T>
struct Rows {
  const T* logits;
  const int64_t* z;
  const int64_t* x0;
  const double* alpha;
  const double* dalpha;
  float* loss;
  T* grad;  // nullptr: no gradient
  int64_t K;
};

using usdm::use_f32;

// Float64 entries (std::exp, log1p): the original kernel's row.
template <class T>
inline void row_f64(const Rows<T>& a, int64_t row, const usdm::Token& t) {
  const int64_t K = a.K;
  const T* lr = a.logits + row * K;
  const int64_t x = a.x0[row], zz = a.z[row];
  double m = -INFINITY;
  for (int64_t j = 0; j < K; ++j) m = std::max(m, double(to_float(lr[j])));
  double se = 0.0;
  for (int64_t j = 0; j < K; ++j) se += std::exp(double(to_float(lr[j])) - m);
  const double lse = m + std::log(se);
  usdm::Sums small{0.0, 0.0, 0.0};
  int64_t b = -1;
  double p_b = 0.0;
  for (int64_t j = 0; j < K; ++j) {
    if (j == x || j == zz) continue;
    const double p = std::exp(double(to_float(lr[j])) - lse);
    if (usdm::is_big(p)) {
      b = j;
      p_b = p;
    } else {
      usdm::accumulate(small, p, t.r);
    }
  }
  const usdm::Sums s = usdm::add_big(small, p_b, t.r, b >= 0);
  const double p_x = std::exp(double(to_float(lr[x])) - lse), p_z = std::exp(double(to_float(lr[zz])) - lse);
  a.loss[row] = float(usdm::loss(t, p_x, p_z, s));
  if (a.grad) {
    const usdm::Grad g = usdm::grad_constants(t, p_x, p_z, s, small.P_excl, p_b);
    T* gr = a.grad + row * K;
    for (int64_t j = 0; j < K; ++j)
      gr[j] = from_float<T>(float(usdm::grad_entry(std::exp(double(to_float(lr[j])) - lse), g.F, g.C, g.r)));
    if (b >= 0) gr[b] = from_float<T>(float(g.grad_b));
    gr[zz] = from_float<T>(float(g.grad_z));
    gr[x] = from_float<T>(float(g.grad_x));
  }
}

// Sweep 2 over entries [lo, hi): adds sum log1p(u_j) to S, sum e_j to E and
// sum e_j (1 - q_j) to A (A = r se Q: p^2 q = p (1 - q) / r). 1 - q is u q
// while u <= 1, and e - e q in double once u > 1: there e q ~ e / u carries the
// float error, not e, so peaked rows with large r keep Q to ~1e-7 / u per entry
// (the gradient bracket C - p q cancels to ~q / r there).
[[gnu::always_inline]] inline void sweep2(const float* e, int64_t lo, int64_t hi, float R_hi, float R_lo, double& S,
                                          double& E, double& A) {
  double s = 0.0, es = 0.0, as = 0.0;
#pragma omp simd reduction(+ : s, es, as)
  for (int64_t j = lo; j < hi; ++j) {
    const float ej = e[j];
    const float u = ej * R_hi + ej * R_lo;  // r p_j
    const float y = 1.0f + u;
    const float q = 1.0f / y;
    const bool big = u > 1.0f;  // e (1 - q) = e f - g: f = 1, g = e q if big, else f = u q, g = 0
    const float f = fastmath::select(big, 1.0f, u * q), g = fastmath::select(big, ej * q, 0.0f);
    s += double(fastmath::log1p_nonneg(u, y, q));
    es += double(ej);
    as += double(ej) * double(f) - double(g);
  }
  S += s;
  E += es;
  A += as;
}

// Float32 entries; scratch holds K floats.
template <bool kGrad, class T>
[[gnu::always_inline]] inline void row_f32(const Rows<T>& a, int64_t row, const usdm::Token& t, float* scratch) {
  const int64_t K = a.K;
  const T* lr = a.logits + row * K;
  const int64_t x = a.x0[row], zz = a.z[row];
  float m = -INFINITY;
  int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
  for (int64_t j = 0; j < K; ++j) {
    const float v = to_float(lr[j]);
    m = v > m ? v : m;
    nan |= int(v != v);
  }
  if (nan || !(std::fabs(m) < INFINITY)) {  // NaN, +inf, or all -inf: the float64 path's NaN / inf semantics
    row_f64(a, row, t);
    return;
  }
  double se = 0.0;
#pragma omp simd reduction(+ : se)
  for (int64_t j = 0; j < K; ++j) {
    const float ej = fastmath::exp_nonpos<kExpMinK>(to_float(lr[j]) - m);
    scratch[j] = ej;
    se += double(ej);
  }
  // b: p > 1/2 is only possible for the unique maximum, p_max = 1 / se (its e is 1).
  int64_t b = -1;
  if (se < 2.0) {
    const int64_t jm = find_first(lr, K, m);
    if (jm != x && jm != zz) b = jm;
  }
  const double inv = 1.0 / se, R = t.r * inv;
  const float R_hi = float(R), R_lo = float(R - double(R_hi));
  // Sweep 2 over the segments between the excluded entries {x, z, b}, in order.
  int64_t cut[4] = {x, zz, b, K};
  std::sort(cut, cut + 3);
  double S = 0.0, E = 0.0, A = 0.0;
  int64_t lo = 0;
  for (int c = 0; c < 4; ++c) {
    if (cut[c] < lo) continue;  // b = -1, or x == z
    sweep2(scratch, lo, cut[c], R_hi, R_lo, S, E, A);
    lo = cut[c] + 1;
  }
  const usdm::Sums small{S, E * inv, A * inv / t.r};
  const double p_b = b >= 0 ? double(scratch[b]) * inv : 0.0;
  const usdm::Sums s = usdm::add_big(small, p_b, t.r, b >= 0);
  const double p_x = double(scratch[x]) * inv, p_z = double(scratch[zz]) * inv;
  // z == x0 with C > 0: p_z P_z W < Q_z, i.e. the model gives the clean token almost
  // no probability (below ~1/K^2). Then the brackets C - p_j q_j are the spread of
  // p_j q_j around its mean, which cancels in float for near-flat rows (errors up to
  // ~2e-5 of the row's largest gradient entry, found by tests/test_fuzz.py): such
  // rows (rare: a confidently wrong model) take the float64 entries, with or without
  // the gradient (so the loss does not depend on whether it is asked for).
  const usdm::Grad g = usdm::grad_constants(t, p_x, p_z, s, small.P_excl, p_b);
  if (t.e && g.C > 0.0) {
    row_f64(a, row, t);
    return;
  }
  a.loss[row] = float(usdm::loss(t, p_x, p_z, s));
  if constexpr (kGrad) {
    // grad_j = p_j F (C - p_j q_j) = e_j (F / (r se)) (r C - u_j q_j), the bracket
    // as H - u q (H = r C) while u <= 1, else as q - G (G = 1 - r C, in double):
    // for u > 1 both r C and u q are ~1 and their difference ~q.
    const double H = t.r * g.C;
    const float Hf = float(H), Gf = float(1.0 - H), k = float(g.F * inv / t.r);
    T* gr = a.grad + row * K;
#pragma omp simd
    for (int64_t j = 0; j < K; ++j) {
      const float ej = scratch[j];
      const float u = ej * R_hi + ej * R_lo;
      const float q = 1.0f / (1.0f + u);
      const float bracket = fastmath::select(u > 1.0f, q - Gf, Hf - u * q);
      gr[j] = from_float<T>(ej * k * bracket);
    }
    if (b >= 0) gr[b] = from_float<T>(float(g.grad_b));
    gr[zz] = from_float<T>(float(g.grad_z));
    gr[x] = from_float<T>(float(g.grad_x));
  }
}

// Rows [begin, end); scratch holds K floats.
template <class T>
[[gnu::always_inline]] inline void rows_impl(const Rows<T>& a, int64_t begin, int64_t end, float* scratch) {
  for (int64_t row = begin; row < end; ++row) {
    const usdm::Token t = usdm::token_constants(a.K, a.alpha[row], a.dalpha[row], a.x0[row] == a.z[row]);
    if (!use_f32(t))
      row_f64(a, row, t);
    else if (a.grad)
      row_f32<true>(a, row, t, scratch);
    else
      row_f32<false>(a, row, t, scratch);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <class T>
[[gnu::target("avx2,fma")]] inline void rows_avx2(const Rows<T>& a, int64_t begin, int64_t end, float* scratch) {
  rows_impl(a, begin, end, scratch);
}
template <class T>
inline void rows_base(const Rows<T>& a, int64_t begin, int64_t end, float* scratch) { rows_impl(a, begin, end, scratch); }
template <class T>
inline void rows(const Rows<T>& a, int64_t begin, int64_t end, float* scratch) {
  if (have_avx2_fma())
    rows_avx2(a, begin, end, scratch);
  else
    rows_base(a, begin, end, scratch);
}
#else
template <class T>
inline void rows(const Rows<T>& a, int64_t begin, int64_t end, float* scratch) { rows_impl(a, begin, end, scratch); }
#endif

}  // namespace usdm_cpu
}  // namespace duo_fast
