// Row math of the distillation KLs (SPEC section 3), shared by the CPU and CUDA
// kernels. Per token, with ls, lt the student and teacher logits and
// lse_S, lse_T their log-sum-exps, d_j = (ls_j - lse_S) - (lt_j - lse_T):
//   bwd: KL(pS || pT) = sum_j pS_j d_j,   dKL/dls_i = pS_i (d_i - KL)
//   fwd: KL(pT || pS) = -sum_j pT_j d_j,  dKL/dls_i = pS_i - pT_i
// (softmax Jacobian: dpS_j/dls_i = pS_j ([i=j] - pS_i)). The teacher gets no
// gradient. Three sweeps: both log-sum-exps, the KL, the gradient.
#pragma once

#include <cmath>

#include "duo_fast/common.h"

namespace duo_fast {
namespace distill {

enum Direction : int { kBackward = 0, kForward = 1 };

// One entry's contribution to the KL sum (accumulated by the caller).
template <class T>
DUO_HD T kl_term(int direction, T ls, T lt, T lse_s, T lse_t) {
  const T log_ps = ls - lse_s, log_pt = lt - lse_t;
  const T d = log_ps - log_pt;
  return direction == kBackward ? exp(log_ps) * d : -exp(log_pt) * d;
}

// dKL/dls_i given the row's KL.
template <class T>
DUO_HD T grad_term(int direction, T ls, T lt, T lse_s, T lse_t, T kl) {
  const T log_ps = ls - lse_s, log_pt = lt - lse_t;
  const T ps = exp(log_ps);
  return direction == kBackward ? ps * ((log_ps - log_pt) - kl) : ps - exp(log_pt);
}

}  // namespace distill
}  // namespace duo_fast
