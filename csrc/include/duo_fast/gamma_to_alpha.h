// The diffusion transformation operator (docs/math.md §1): alpha(gamma) and
// d alpha / d gamma for vocabulary size K, evaluated from a per-K table.
//
//   pt(gamma)    = int phi(t) Phi(t + nu)^(K-1) dt,      nu = exp(-gamma/2)
//   alpha        = (K pt - 1) / (K - 1)
//   dalpha/dgamma= -(nu/2) K int phi(t) phi(t+nu) Phi(t+nu)^(K-2) dt
//                  (integration by parts of the reference's form: positive integrand)
//
// The table (built once per K on the host by gamma_to_alpha_table.h, by adaptive
// Gauss-Legendre quadrature) holds piecewise Chebyshev expansions, on
// kIntervals intervals of width kStep covering [kGammaLo, kGammaHi], of
//   f0 = log(alpha), f1 = log(1 - alpha), f2 = log(-dalpha/dgamma).
// Interpolating logs gives *relative* accuracy in alpha, 1 - alpha and dalpha
// over their whole range (1 - alpha decays like exp(-nu^2/4)).
// Outside the table:
//   gamma < kGammaLo: 1 - alpha and dalpha are below 1e-300 for every K <= 2^24:
//                     alpha = 1, dalpha = 0.
//   gamma > kGammaHi: nu < 4.6e-5, second-order expansion in nu (relative error
//                     O(nu^2) < 3e-9) with mu_m = E[max of K normals ^ m]:
//                     alpha = (nu mu1 + nu^2 (mu2 - 1)/2) / (K-1),
//                     dalpha/dgamma = -(nu/2)(mu1 + nu (mu2 - 1)) / (K-1).
#pragma once

#include <cmath>

#include "duo_fast/common.h"

namespace duo_fast {
namespace schedule {

constexpr double kGammaLo = -9.0;
constexpr double kGammaHi = 20.0;
constexpr double kStep = 0.25;
constexpr int kIntervals = 116;  // (kGammaHi - kGammaLo) / kStep
constexpr int kDegree = 12;      // Chebyshev coefficients per function and interval
constexpr int kFunctions = 3;    // log alpha, log(1 - alpha), log(-dalpha/dgamma)
constexpr int kHeader = 4;       // K, mu1, mu2, (reserved)
constexpr int kTableSize = kHeader + kIntervals * kFunctions * kDegree;

DUO_HD const double* coefficients(const double* table, int interval, int function) {
  return table + kHeader + (interval * kFunctions + function) * kDegree;
}

// Clenshaw sum of c_0/2 + sum_k c_k T_k(x), x in [-1, 1].
DUO_HD double chebyshev_eval(const double* c, double x) {
  double b1 = 0.0, b2 = 0.0;
  const double x2 = 2.0 * x;
  for (int k = kDegree - 1; k >= 1; --k) {
    const double b0 = fma(x2, b1, c[k] - b2);
    b2 = b1;
    b1 = b0;
  }
  return fma(x, b1, 0.5 * c[0] - b2);
}

// alpha(gamma) and d alpha / d gamma from the table of one K.
DUO_HD void gamma_to_alpha(const double* table, double gamma, double& alpha, double& dalpha_dgamma) {
  if (gamma != gamma) {  // NaN propagates
    alpha = dalpha_dgamma = gamma;
    return;
  }
  if (gamma < kGammaLo) {
    alpha = 1.0;
    dalpha_dgamma = -0.0;
    return;
  }
  if (gamma > kGammaHi) {
    const double km1 = table[0] - 1.0, mu1 = table[1], mu2 = table[2];
    const double nu = exp(-0.5 * gamma);  // 0 at +inf
    alpha = nu * (mu1 + 0.5 * nu * (mu2 - 1.0)) / km1;
    dalpha_dgamma = -0.5 * nu * (mu1 + nu * (mu2 - 1.0)) / km1;
    return;
  }
  const double pos = (gamma - kGammaLo) * (1.0 / kStep);
  int i = int(pos);
  if (i > kIntervals - 1) i = kIntervals - 1;
  const double x = 2.0 * (pos - double(i)) - 1.0;
  const double log_one_minus = chebyshev_eval(coefficients(table, i, 1), x);
  // Take alpha from whichever of alpha, 1 - alpha is the smaller (relative accuracy).
  alpha = log_one_minus < -0.69314718055994531 ? -expm1(log_one_minus)
                                               : exp(chebyshev_eval(coefficients(table, i, 0), x));
  dalpha_dgamma = -exp(chebyshev_eval(coefficients(table, i, 2), x));
}

}  // namespace schedule
}  // namespace duo_fast
