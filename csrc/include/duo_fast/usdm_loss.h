// Row math of the fused uniform-state diffusion loss (docs/math.md §3), shared by
// the CPU and CUDA kernels.
//
// Per token: p = softmax(logits), K, alpha, dalpha, clean id x, noisy id z,
// e = [x == z]. With r = K alpha / (1 - alpha) the model's marginal is
// xb_j = K alpha p_j + 1 - alpha = (1 - alpha)(1 + r p_j), so every log in the reference's
// term2 becomes L_j = log1p(r p_j) and the large K log(1 - alpha) parts cancel
// analytically. Writing P_y = sum_{j != y} p_j (= 1 - p_y, but summed so it keeps
// its relative accuracy), S_y = sum_{j != y} L_j and D_y = log((1+r)/(1+r p_y))
// = log1p(r P_y / (1 + r p_y)), the reference's loss = coeff (term1 - term2),
// coeff = dalpha / (K alpha), is
//   e = 0: T = K/(1-alpha) r p_z/(1 + r p_z) - (K + r) L_z + S_x - (1 + r) D_x
//   e = 1: T = [(K - 1) D_z + S_z - K r P_z / ((1-alpha)(1 + r p_z))] / (1 + r)
//   loss = coeff T.
// Every term vanishes for a perfect model (p = onehot(x)), so small losses are
// not differences of large numbers.
//
// Gradient. With g_j = d loss / d p_j, d loss / d logits_i = p_i (g_i - G),
// G = sum_j p_j g_j (softmax Jacobian). Differentiating the reference's form
// (d xb_j / d p_j = K alpha, K alpha / xb_j = r q_j with q_j = 1/(1 + r p_j))
// gives g_j = coeff A r q_j plus extra terms at z and x (A = 1/(1+r) if e else 1).
// The large parts cancel against G analytically: with Q = sum_j p_j^2 q_j,
// q_i - sum_j p_j q_j = r (Q - p_i q_i), and
//   e = 0: (g_i - G) / (coeff r^2) = C - p_i q_i + [i=z] e_z + [i=x] q_x,
//          e_z = -K p_z q_z^2 / (1-alpha),  C = Q_x - p_x q_x P_x - p_z e_z,
//          Q_y = sum_{j != y} p_j^2 q_j; at x and z the brackets are rewritten
//          with P_y = sum_{j != y} p_j in place of 1 - p_y (no cancellation);
//   e = 1: (g_i - G) / (coeff A r^2) = C - p_i q_i (i != z),  Q_z + P_z^2 W (i = z),
//          W = q_z^2 (K + 1 + r + r p_z),  C = Q_z - p_z P_z W.
// Every bracket vanishes for a perfect model, so the gradient keeps its
// relative accuracy as the loss goes to 0 (the naive p_i (g_i - G) loses
// ~log10(1/alpha) digits to cancellation).
//
// At most one other entry b can have p_b > 1/2; its bracket C - p_b q_b would
// cancel (C holds p_b^2 q_b), so it is kept out of the sums and its entry is
// C_without_b - p_b q_b P_b, with P_b = sum_{j != b} p_j.
//
// Sweeps over a row: (1) log-sum-exp; (2) S, P, Q = sums over j not in
// {x, z, b} of log1p(r p_j), p_j, p_j^2 q_j, and b; (3) the gradient. No [N, K]
// temporary.
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/common.h"

namespace duo_fast {
namespace usdm {

// Per-token constants.
struct Token {
  double K, alpha, r, coeff, A;
  bool e;
};

DUO_HD Token token_constants(int64_t vocab_size, double alpha, double dalpha, bool e) {
  Token t;
  t.K = double(vocab_size);
  t.alpha = alpha;
  t.r = t.K * alpha / (1.0 - alpha);
  t.coeff = dalpha / (t.K * alpha);
  t.A = e ? 1.0 / (1.0 + t.r) : 1.0;
  t.e = e;
  return t;
}

// The float32 entry switch shared by the CPU (cpu/usdm_loss_rows.h, which
// derives it) and CUDA kernels: float32 entries (double sums) keep the loss and
// gradient within the tests' 1e-5 relative + 1e-6 absolute except for rows with
// 1 - alpha < kF32MinOneMinusAlpha (loss error ~1e-7 |dalpha| / (1 - alpha)),
// r < kF32MinR (the loss is ~|dalpha| r: a fixed float error becomes a large
// relative one) and tiny vocabularies; those take float64 entries.
constexpr double kF32MinOneMinusAlpha = 1e-3;
constexpr double kF32MinR = 1e-2;
constexpr int64_t kF32MinVocab = 16;

DUO_HD bool use_f32(const Token& t) {
  return t.K >= double(kF32MinVocab) && 1.0 - t.alpha >= kF32MinOneMinusAlpha && t.r >= kF32MinR;
}

// Row reductions of sweep 2 (p_x, p_z come from the logits at x and z).
struct Sums {
  double S_excl;  // sum_{j not in {x, z}} log1p(r p_j)
  double P_excl;  // sum_{j not in {x, z}} p_j
  double Q_excl;  // sum_{j not in {x, z}} p_j^2 / (1 + r p_j)
};

// The three summands of entry j (the caller skips j = x, z and the big entry).
template <class T>
DUO_HD void accumulate(Sums& s, T p, T r) {
  const T u = r * p;
  s.S_excl += double(log1p(u));
  s.P_excl += double(p);
  s.Q_excl += double(p * p / (T(1) + u));
}

// Sweep 2 skips an entry j not in {x, z} when p_j > 1/2 (at most one: b).
DUO_HD bool is_big(double p) { return p > 0.5; }

// Sums without b (sweep 2's result) -> with b; also P_b = sum_{j != b} p_j.
DUO_HD Sums add_big(const Sums& small, double p_b, double r, bool has_big) {
  if (!has_big) return small;
  return {small.S_excl + log1p(r * p_b), small.P_excl + p_b, small.Q_excl + p_b * p_b / (1.0 + r * p_b)};
}

DUO_HD double loss(const Token& t, double p_x, double p_z, const Sums& s) {
  const double r = t.r, K = t.K, inv_1ma = 1.0 / (1.0 - t.alpha);
  const double L_z = log1p(r * p_z);
  double T;
  if (!t.e) {
    const double P_x = s.P_excl + p_z;
    const double S_x = s.S_excl + L_z;
    const double D_x = log1p(r * P_x / (1.0 + r * p_x));
    T = K * inv_1ma * r * p_z / (1.0 + r * p_z) - (K + r) * L_z + S_x - (1.0 + r) * D_x;
  } else {
    const double P_z = s.P_excl, S_z = s.S_excl;
    const double D_z = log1p(r * P_z / (1.0 + r * p_z));
    T = ((K - 1.0) * D_z + S_z - K * r * P_z * inv_1ma / (1.0 + r * p_z)) / (1.0 + r);
  }
  return t.coeff * T;
}

// grad_i = p_i F (C - p_i / (1 + r p_i)) for i not in {x, z, b}; grad_x, grad_z,
// grad_b whole.
struct Grad {
  double F, C, r, grad_x, grad_z, grad_b;
};

// s: the sums including b (add_big); small_P: P without b; p_b = 0 if no b.
DUO_HD Grad grad_constants(const Token& t, double p_x, double p_z, const Sums& s, double small_P, double p_b) {
  const double r = t.r, K = t.K;
  const double q_z = 1.0 / (1.0 + r * p_z);
  Grad g;
  g.r = r;
  if (!t.e) {
    const double q_x = 1.0 / (1.0 + r * p_x);
    const double P_x = s.P_excl + p_z, Q_x = s.Q_excl + p_z * p_z * q_z;
    const double e_z = -K * p_z * q_z * q_z / (1.0 - t.alpha);
    g.F = t.coeff * r * r;
    g.C = Q_x - p_x * q_x * P_x - p_z * e_z;
    const double P_z = s.P_excl + p_x;
    // C + q_x P_x and C - p_z q_z + e_z with the (1 - p) factors summed, not subtracted.
    g.grad_x = p_x * g.F * (s.Q_excl + p_z * p_z * q_z + q_x * P_x * P_x - p_z * e_z);
    g.grad_z = p_z * g.F * (s.Q_excl - p_z * q_z * P_z - p_x * q_x * P_x + e_z * P_z);
  } else {
    const double P_z = s.P_excl, Q_z = s.Q_excl;
    const double W = q_z * q_z * (K + 1.0 + r + r * p_z);
    g.F = t.coeff * t.A * r * r;
    g.C = Q_z - p_z * P_z * W;
    g.grad_z = p_z * g.F * (Q_z + P_z * P_z * W);
    g.grad_x = g.grad_z;
  }
  // b: C - p_b q_b with C's p_b^2 q_b term taken out and 1 - p_b summed.
  const double q_b = 1.0 / (1.0 + r * p_b);
  const double P_b = small_P + p_x + (t.e ? 0.0 : p_z);
  g.grad_b = p_b * g.F * ((g.C - p_b * p_b * q_b) - p_b * q_b * P_b);
  return g;
}

// grad_i for i not in {x, z}.
template <class T>
DUO_HD T grad_entry(T p, T F, T C, T r) {
  return p * F * (C - p / (T(1) + r * p));
}

}  // namespace usdm
}  // namespace duo_fast
