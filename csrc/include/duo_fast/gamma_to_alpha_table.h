// Host-only construction of the per-K table evaluated by gamma_to_alpha.h.
//
// Each integral is of a log-concave integrand exp(g(t)) (a product of normal
// densities and powers of Phi): we locate its mode by golden-section search,
// widen a window until g drops 60 below the mode (concavity makes that window
// hold all but e^-60 of the mass, relative), and integrate exp(g - g_max) there
// by adaptive 16-point Gauss-Legendre. Results are returned as logs,
// so values like 1 - alpha = 1e-2000 are represented exactly.
#pragma once

#include <cmath>
#include <vector>

#include "duo_fast/gamma_to_alpha.h"
#include "duo_fast/special.h"

namespace duo_fast {
namespace schedule {

namespace detail {

struct GaussLegendre16 {
  double x[16], w[16];
  GaussLegendre16() {
    // Newton iteration on P_16 from the Chebyshev-like initial guesses.
    const int n = 16;
    for (int i = 0; i < n; ++i) {
      double z = cos(M_PI * (i + 0.75) / (n + 0.5)), dp = 0.0;
      for (int it = 0; it < 100; ++it) {
        double p0 = 1.0, p1 = 0.0;
        for (int j = 1; j <= n; ++j) {
          const double p2 = p1;
          p1 = p0;
          p0 = ((2.0 * j - 1.0) * z * p1 - (j - 1.0) * p2) / j;
        }
        dp = n * (z * p0 - p1) / (z * z - 1.0);
        const double dz = p0 / dp;
        z -= dz;
        if (fabs(dz) < 1e-17) break;
      }
      x[i] = z;
      w[i] = 2.0 / ((1.0 - z * z) * dp * dp);
    }
  }
};

inline const GaussLegendre16& gauss_legendre16() {
  static const GaussLegendre16 rule;
  return rule;
}

template <class F>
double gl16(const F& f, double a, double b) {
  const GaussLegendre16& r = gauss_legendre16();
  const double h = 0.5 * (b - a), c = 0.5 * (a + b);
  double s = 0.0;
  for (int i = 0; i < 16; ++i) s += r.w[i] * f(c + h * r.x[i]);
  return s * h;
}

// Adaptive 16-point Gauss-Legendre over [a, b]: a panel is accepted when its
// estimate agrees with the sum over its two halves to `rel` of the running
// total (the integrands have a sharp cliff where Phi^(K-1) switches on, whose
// width shrinks like 1/sqrt(2 log K); elsewhere they are smooth).
template <class F>
double integrate(const F& f, double a, double b, double rel = 1e-14, int panels = 6) {
  struct Panel {
    double a, b, value;
  };
  Panel stack[64];
  int top = 0;
  double total = 0.0, result = 0.0;
  const double h = (b - a) / panels;
  for (int i = panels - 1; i >= 0; --i) {
    const double lo = a + i * h, hi = (i + 1 == panels) ? b : a + (i + 1) * h;
    stack[top++] = {lo, hi, gl16(f, lo, hi)};
    total += fabs(stack[top - 1].value);  // L1 scale: integrands may change sign
  }
  int splits = 0;
  while (top > 0) {
    const Panel p = stack[--top];
    ++splits;
    const double m = 0.5 * (p.a + p.b);
    const double left = gl16(f, p.a, m), right = gl16(f, m, p.b);
    // !(err > tol) also accepts a NaN estimate instead of splitting forever.
    if (!(fabs(left + right - p.value) > rel * fabs(total)) || top + 2 > 64 || splits > 256) {
      result += left + right;
    } else {
      stack[top++] = {m, p.b, right};
      stack[top++] = {p.a, m, left};
    }
  }
  return result;
}

// Mode and mass window of a concave log-integrand g, mode searched in [lo, hi].
struct Window {
  double a, b, g_max;
};

template <class G>
Window log_concave_window(const G& g, double lo, double hi) {
  constexpr double kInvPhi = 0.61803398874989484820;
  double a = lo, b = hi;
  double c = b - kInvPhi * (b - a), d = a + kInvPhi * (b - a);
  double gc = g(c), gd = g(d);
  for (int it = 0; it < 80 && b - a > 1e-4; ++it) {
    // -inf on both probes means the mass is to the right (Phi^n underflow) for
    // all our integrands; move the bracket there.
    if (gc > gd || (gc == gd && gc > -INFINITY)) {
      b = d;
      d = c;
      gd = gc;
      c = b - kInvPhi * (b - a);
      gc = g(c);
    } else {
      a = c;
      c = d;
      gc = gd;
      d = a + kInvPhi * (b - a);
      gd = g(d);
    }
  }
  const double mode = 0.5 * (a + b);
  const double g_max = g(mode);
  constexpr double kDrop = 60.0;
  double s = 0.125;
  while (g(mode - s) > g_max - kDrop && s < 1e4) s *= 2.0;
  const double left = mode - s;
  s = 0.125;
  while (g(mode + s) > g_max - kDrop && s < 1e4) s *= 2.0;
  return {left, mode + s, g_max};
}

// log of the integral of exp(g) for concave g with its mode in [lo, hi].
template <class G>
double log_integral(const G& g, double lo, double hi) {
  const Window w = log_concave_window(g, lo, hi);
  const double v = integrate([&](double t) { return exp(g(t) - w.g_max); }, w.a, w.b);
  return w.g_max + log(v);
}

inline double pow_log_ndtr(double n, double v) { return n == 0.0 ? 0.0 : n * log_ndtr(v); }

// log(1 - Phi(v)^n), accurate even where 1 - Phi(v) underflows (v > 38):
// with Q = Phi(-v), -log Phi(v) = -log1p(-Q) = Q (1 + Q/2 + Q^2/3 + ...), and
// 1 - exp(-y) = y (1 - y/2 + ...) for y = -n log Phi(v) -> 0.
inline double log1m_pow_ndtr(double n, double v) {
  const double log_q = log_ndtr(-v);
  const double q = exp(log_q);
  const double log_neg_log_phi = q < 1e-5 ? log_q + log1p(q * (0.5 + q / 3.0)) : log(-log_ndtr(v));
  const double log_y = log(n) + log_neg_log_phi;
  return log_y < -20.0 ? log_y + log1p(-0.5 * exp(log_y)) : log(-expm1(-exp(log_y)));
}

}  // namespace detail

// log(1 - pt) = log int phi(t) (1 - Phi(t+nu)^(K-1)) dt.
inline double log_one_minus_pt(double K, double nu) {
  auto g = [&](double t) { return log_normal_pdf(t) + detail::log1m_pow_ndtr(K - 1.0, t + nu); };
  return detail::log_integral(g, -nu - 40.0, 1.0);
}

// pt - 1/K = int phi(u) Phi(u)^(K-1) expm1(nu u - nu^2/2) du: the difference of
// the nu and nu=0 integrands, formed without cancellation (used when alpha is small).
inline double pt_minus_uniform(double K, double nu) {
  auto g0 = [&](double u) { return log_normal_pdf(u) + detail::pow_log_ndtr(K - 1.0, u); };
  auto g1 = [&](double u) { return log_normal_pdf(u - nu) + detail::pow_log_ndtr(K - 1.0, u); };
  const detail::Window w0 = detail::log_concave_window(g0, -10.0, 10.0);
  const detail::Window w1 = detail::log_concave_window(g1, nu - 10.0, nu + 10.0);
  const double a = fmin(w0.a, w1.a), b = fmax(w0.b, w1.b), g_max = fmax(w0.g_max, w1.g_max);
  const double v = detail::integrate(
      [&](double u) { return exp(g0(u) - g_max) * expm1(nu * u - 0.5 * nu * nu); }, a, b);
  return v * exp(g_max);
}

// log(-dalpha/dgamma) = log(nu/2) + log K + log int phi(t) phi(t+nu) Phi(t+nu)^(K-2) dt.
inline double log_neg_dalpha(double K, double nu) {
  auto g = [&](double t) {
    return log_normal_pdf(t) + log_normal_pdf(t + nu) + detail::pow_log_ndtr(K - 2.0, t + nu);
  };
  return log(0.5 * nu) + log(K) + detail::log_integral(g, -0.5 * nu - 1.0, 12.0);
}

// E[M^m] for M the max of K iid N(0,1): K int u^m phi(u) Phi(u)^(K-1) du.
inline double max_normal_moment(double K, int m) {
  auto g = [&](double u) { return log_normal_pdf(u) + detail::pow_log_ndtr(K - 1.0, u); };
  const detail::Window w = detail::log_concave_window(g, -10.0, 10.0);
  const double v = detail::integrate([&](double u) { return pow(u, m) * exp(g(u) - w.g_max); }, w.a, w.b);
  return K * v * exp(w.g_max);
}

// The three tabulated functions at one gamma.
inline void table_functions(double K, double gamma, double out[kFunctions]) {
  const double nu = exp(-0.5 * gamma);
  const double scale = K / (K - 1.0);
  const double log_one_minus_alpha = log(scale) + log_one_minus_pt(K, nu);
  double log_alpha;
  if (log_one_minus_alpha > -0.69314718055994531) {
    log_alpha = log(scale * pt_minus_uniform(K, nu));  // alpha < 1/2
  } else {
    log_alpha = log1p(-exp(log_one_minus_alpha));
  }
  out[0] = log_alpha;
  out[1] = log_one_minus_alpha;
  out[2] = log_neg_dalpha(K, nu);
}

// Fill the coefficients of interval i (Chebyshev interpolation at the
// kDegree Chebyshev points of the first kind).
inline void build_interval(double K, int i, double* table) {
  double f[kDegree][kFunctions];
  const double g0 = kGammaLo + i * kStep;
  for (int j = 0; j < kDegree; ++j) {
    const double x = cos(M_PI * (j + 0.5) / kDegree);
    table_functions(K, g0 + 0.5 * kStep * (x + 1.0), f[j]);
  }
  for (int fn = 0; fn < kFunctions; ++fn) {
    double* c = table + kHeader + (i * kFunctions + fn) * kDegree;
    for (int k = 0; k < kDegree; ++k) {
      double s = 0.0;
      for (int j = 0; j < kDegree; ++j) s += f[j][fn] * cos(M_PI * k * (j + 0.5) / kDegree);
      c[k] = 2.0 * s / kDegree;
    }
  }
}

inline void build_header(double K, double* table) {
  table[0] = K;
  table[1] = max_normal_moment(K, 1);
  table[2] = max_normal_moment(K, 2);
  table[3] = 0.0;
}

// Whole table, serially (the CPU op parallelizes over intervals instead).
inline std::vector<double> build_table(double K) {
  std::vector<double> t(kTableSize);
  build_header(K, t.data());
  for (int i = 0; i < kIntervals; ++i) build_interval(K, i, t.data());
  return t;
}

}  // namespace schedule
}  // namespace duo_fast
