// Normal-distribution special functions in float64, usable on host and device:
// log phi, Phi, log Phi (log_ndtr) and Phi^-1 (ndtri), accurate to a few ulp
// over the whole double range (including both tails).
#pragma once

#include <cmath>

#include "duo_fast/common.h"

namespace duo_fast {

constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kInvSqrt2 = 0.70710678118654752440;
constexpr double kLogSqrt2Pi = 0.91893853320467274178;  // log(sqrt(2*pi))

// log phi(x), the standard normal log-density.
DUO_HD double log_normal_pdf(double x) { return -0.5 * x * x - kLogSqrt2Pi; }

// Phi(x) = erfc(-x/sqrt2)/2: relative accuracy in the lower tail.
DUO_HD double normal_cdf(double x) { return 0.5 * erfc(-x * kInvSqrt2); }

// 1 - 1/x^2 + 3/x^4 - 15/x^6 + ... (the Mills-ratio series), truncated below 1e-16
// for x < -30: Phi(x) = phi(x) / (-x) times it.
DUO_HD double ndtr_tail_series(double x) {
  const double r = 1.0 / (x * x);
  // 1 - r + 3r^2 - 15r^3 + 105r^4 - 945r^5 + 10395r^6 - 135135r^7
  return 1.0 + r * (-1.0 + r * (3.0 + r * (-15.0 + r * (105.0 + r * (-945.0 + r * (10395.0 - r * 135135.0))))));
}

// log Phi(x).
//   x > 0        : log1p(-Q(x)) with Q(x) = erfc(x/sqrt2)/2 (no cancellation near 1)
//   -30 <= x <= 0: log(erfc(-x/sqrt2)/2) (erfc is relative-accurate, no underflow)
//   x < -30      : Mills-ratio series, log Phi(x) = log phi(x) - log(-x)
//                  + log(ndtr_tail_series(x)).
DUO_HD double log_ndtr(double x) {
  if (x > 0.0) return log1p(-0.5 * erfc(x * kInvSqrt2));
  if (x >= -30.0) return log(0.5 * erfc(-x * kInvSqrt2));
  return log_normal_pdf(x) - log(-x) + log(ndtr_tail_series(x));
}

// S^2/2 + log Phi(u - S) - u S, the log of a Gaussian moment generating function
// truncated at u (E[e^{S g}; g < u], g ~ N(0, 1)) over its leading factor e^{u S}.
// For x = u - S < -30 the large terms cancel analytically (S^2/2 - (u - S)^2/2 =
// u S - u^2/2): -u^2/2 - log sqrt(2 pi) - log(-x) + log(ndtr_tail_series(x)), no
// large term left (summed in double they lose every digit once S^2 ~ 1e16, and
// give garbage beyond). Above, |S| <= |u| + 30: every term is moderate.
DUO_HD double truncated_mgf_excess(double S, double u) {
  const double x = u - S;
  if (x >= -30.0) return 0.5 * S * S + log_ndtr(x) - u * S;
  return -0.5 * u * u - kLogSqrt2Pi - log(-x) + log(ndtr_tail_series(x));
}

// Acklam's approximation alone (relative error < 1.15e-9), for p in (0, 1).
DUO_HD double ndtri_approx(double p) {
  constexpr double p_low = 0.02425;
  const bool upper = p > 0.5;
  const double q = upper ? 1.0 - p : p;  // q <= 0.5, exact for p > 0.5 (Sterbenz)
  double x;
  if (q >= p_low) {
    const double r = p - 0.5, r2 = r * r;
    x = (((((-3.969683028665376e+01 * r2 + 2.209460984245205e+02) * r2 - 2.759285104469687e+02) * r2 +
           1.383577518672690e+02) * r2 - 3.066479806614716e+01) * r2 + 2.506628277459239e+00) * r /
        (((((-5.447609879822406e+01 * r2 + 1.615858368580409e+02) * r2 - 1.556989798598866e+02) * r2 +
           6.680131188771972e+01) * r2 - 1.328068155288572e+01) * r2 + 1.0);
  } else {
    const double t = sqrt(-2.0 * log(q));
    x = (((((-7.784894002430293e-03 * t - 3.223964580411365e-01) * t - 2.400758277161838e+00) * t -
           2.549732539343734e+00) * t + 4.374664141464968e+00) * t + 2.938163982698783e+00) /
        ((((7.784695709041462e-03 * t + 3.224671290700398e-01) * t + 2.445134137142996e+00) * t +
          3.754408661907416e+00) * t + 1.0);  // the lower-tail value, x < 0
    if (upper) x = -x;
  }
  return x;
}

// Phi^-1(p) for p in (0, 1); -inf at 0, +inf at 1, NaN outside.
// Acklam's rational approximation (relative error < 1.15e-9 over the whole
// range: central rational in p - 1/2 for 0.02425 <= p <= 0.97575, tail rational
// in sqrt(-2 log q) outside) refined by one Halley step on Phi(x) - p (cubic
// convergence: 1e-9 -> full precision). The residual is taken on the tail closer
// to p so both tails keep relative accuracy; callers that need the upper tail
// pass q = 1 - p to ndtri and negate (see max_of_normals).
DUO_HD double ndtri(double p) {
  if (!(p > 0.0 && p < 1.0)) {
    if (p == 0.0) return -INFINITY;
    if (p == 1.0) return INFINITY;
    return NAN;
  }
  const bool upper = p > 0.5;
  const double q = upper ? 1.0 - p : p;  // q <= 0.5, exact for p > 0.5 (Sterbenz)
  double x = ndtri_approx(p);
  // Halley on f(x) = Phi(x) - p, with u = f / phi(x).
  if (p >= 0.25 && p <= 0.75) {
    // Centre: Phi(x) - p = erf(x/sqrt2)/2 - (p - 1/2), both terms exact-ish,
    // so x keeps relative accuracy even as it approaches 0.
    const double u = (0.5 * erf(x * kInvSqrt2) - (p - 0.5)) * exp(0.5 * x * x + kLogSqrt2Pi);
    return x - u / (1.0 + 0.5 * x * u);
  }
  // Tails: residual on the tail of q, as a relative residual times
  // q/phi(x) = exp(log q + x^2/2 + log sqrt(2pi)) so it cannot overflow.
  if (upper) x = -x;
  const double u = (normal_cdf(x) / q - 1.0) * exp(log(q) + 0.5 * x * x + kLogSqrt2Pi);
  x = x - u / (1.0 + 0.5 * x * u);
  return upper ? -x : x;
}

}  // namespace duo_fast
