// Row math of canvas_step, shared by the CPU and CUDA kernels: per row of
// logits x and temperature T, with p = softmax(x / T),
//   sample  ~ p       (one inverse-CDF draw, sample_step.h's machinery),
//   argmax  = the first j with x_j = max x (torch.argmax's tie rule),
//   entropy = H(p) in float32.
//
// Weights relative to the row max M: y_j = (x_j - M) / T <= 0 and
// w_j = exp(y_j) (fastmath::exp_nonpos: <= 1 ulp, exactly 1 at the max, 0 for
// y < -87 and for -inf logits), S = sum_j w_j, p_j = w_j / S. The entropy is
//   H = log S - sum_j w_j y_j / S = log1p(delta) + b / (1 + delta),
// delta = S - 1 = sum of w_j over every entry but the first argmax (its w is
// 1), b = sum_j w_j (-y_j) >= 0. Both terms are sums of nonnegative numbers (no
// cancellation), and delta is summed apart from the 1 so that a nearly one-hot
// row keeps its digits (S = 1 + 1e-20 is 1 in double; log1p(delta) is not 0).
//
// The draw: one 53-bit uniform u (words 2, 3 of the Philox block (stream = row,
// position = offset): sampling::step_draw's u_cat, the same numbers as
// sample_step's model part) and the first j whose inclusive running sum of w
// (float64, index order) exceeds u S. Exact like sample_step: no truncated
// tail (an entry of probability 1e-9 owns an interval of u of that width).
//
// CUDA reads a row once for (M, argmax, delta, b) with an online state
// (Online below: each thread's entries relative to its own running max,
// merged like an online softmax), and a second time, in part, for the draw.
// The CPU reads it twice (the max, then the weights into a scratch row that the
// draw scans). Bad values (sample_step's policy): a row with NaN, +inf or no
// finite logit has no distribution (row_valid is false).
#pragma once

#include <cmath>
#include <cstdint>

#include "duo_fast/common.h"
#include "duo_fast/fast_math.h"

namespace duo_fast {
namespace canvas {

// y = (x - M) / T, computed as (x - M) * (1 / T) in float everywhere.
DUO_HD_ALWAYS float scaled(float x, float M, float inv_temperature) { return (x - M) * inv_temperature; }

// The weight of y (<= 0): exp(y), 0 for -inf.
DUO_HD_ALWAYS float weight(float y) { return fastmath::exp_nonpos(y); }

// The entropy term w (-y) of one entry; 0 where w = 0 (y may be -inf there).
DUO_HD_ALWAYS float entropy_term(float w, float y) { return fastmath::select(w > 0.0f, -(w * y), 0.0f); }

DUO_HD double entropy(double delta, double b) { return log1p(delta) + b / (1.0 + delta); }

// A row is a distribution when its max is finite and no entry is NaN (a +inf
// entry makes the max +inf).
DUO_HD bool row_valid(float M, bool any_nan) { return !any_nan && M - M == 0.0f; }

// Online state of a set of entries (CUDA): m = their max (in logit units), arg =
// the first index holding it, delta = sum of the other entries' w relative to m,
// b = sum of w (-y) relative to m. The identity has m = -inf.
struct Online {
  float m;
  int64_t arg;
  double delta, b;
};

DUO_HD Online online_identity() { return {-INFINITY, INT64_MAX, 0.0, 0.0}; }

// Merge two states (either may be the identity): the winner has the larger max,
// or the lower index among equal maxima; the loser's entries, its max entry
// included (weight 1 at its own scale), are rescaled by f = exp((m_l - m_w) / T):
//   delta += (delta_l + 1) f,   b += f (b_l + (delta_l + 1) (m_w - m_l) / T)
// since -(x - m_w) / T = -(x - m_l) / T + (m_w - m_l) / T.
DUO_HD Online online_merge(Online a, Online b, float inv_temperature) {
  const bool a_wins = a.m > b.m || (a.m == b.m && a.arg < b.arg);
  const Online w = a_wins ? a : b, l = a_wins ? b : a;
  if (l.m == -INFINITY) return w;  // the identity, or entries of probability 0
  const double gap = (double(w.m) - double(l.m)) * double(inv_temperature);  // >= 0
  const double f = exp(-gap), n = l.delta + 1.0;
  return {w.m, w.arg, w.delta + n * f, w.b + f * (l.b + n * gap)};
}

}  // namespace canvas
}  // namespace duo_fast
