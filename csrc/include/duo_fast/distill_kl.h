// Row math of the distillation KLs (docs/math.md §3), shared by the CPU and CUDA
// kernels. Per token, with ls, lt the student and teacher logits and
// lse_S, lse_T their log-sum-exps, d_j = (ls_j - lse_S) - (lt_j - lse_T):
//   bwd: KL(pS || pT) = sum_j pS_j d_j,   dKL/dls_i = pS_i (d_i - KL)
//   fwd: KL(pT || pS) = -sum_j pT_j d_j,  dKL/dls_i = pS_i - pT_i
// (softmax Jacobian: dpS_j/dls_i = pS_j ([i=j] - pS_i)). The teacher gets no
// gradient. Three sweeps: both log-sum-exps, the KL, the gradient.
// A logit -inf is probability 0: 0 log 0 = 0, so such an entry of the weighting
// law (pS for bwd, pT for fwd) adds nothing (and gets gradient 0), while a 0 in
// the other law against a positive weight makes the KL +inf (the gradient of an
// infinite KL is not finite). A row with a NaN or +inf logit in either law, or
// with no finite logit, has no distribution: its KL and whole gradient row are
// NaN (the kernels test every logit with finite_or_masked and the maximum first).
#pragma once

#include <cmath>

#include "duo_fast/common.h"

namespace duo_fast {
namespace distill {

enum Direction : int { kBackward = 0, kForward = 1 };

// A logit that keeps the row a distribution: finite or -inf (probability 0), not
// NaN or +inf.
template <class T>
DUO_HD bool finite_or_masked(T l) {
  return l < T(INFINITY);
}

// One entry's contribution to the KL sum (accumulated by the caller).
template <class T>
DUO_HD T kl_term(int direction, T ls, T lt, T lse_s, T lse_t) {
  const T log_ps = ls - lse_s, log_pt = lt - lse_t;
  // bwd: pS (log pS - log pT); fwd: pT (log pT - log pS); w = the weighting law.
  const T log_w = direction == kBackward ? log_ps : log_pt, log_o = direction == kBackward ? log_pt : log_ps;
  if (log_w == T(-INFINITY)) return T(0);        // 0 log 0 = 0
  if (log_o == T(-INFINITY)) return T(INFINITY);  // w > 0 against 0 (also where exp(log_w) underflows)
  return exp(log_w) * (log_w - log_o);
}

// dKL/dls_i given the row's KL.
template <class T>
DUO_HD T grad_term(int direction, T ls, T lt, T lse_s, T lse_t, T kl) {
  const T log_ps = ls - lse_s, log_pt = lt - lse_t;
  if (direction != kBackward) return exp(log_ps) - exp(log_pt);
  return log_ps == T(-INFINITY) ? T(0) : exp(log_ps) * ((log_ps - log_pt) - kl);
}

}  // namespace distill
}  // namespace duo_fast
