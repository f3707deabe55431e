"""Oracle of gamma_to_alpha (docs/math.md §1) by adaptive quadrature, and the noise
schedules alpha(t) of the reference configuration."""

import functools
import math

import torch

from ._common import DUO_GAMMA_MAX, DUO_GAMMA_MIN, SCHEDULE_EPS, _F64, _LOG_2PI, _f64


def _log_sf_max(x, n1):
  """log P(max of n1 iid N(0,1) > x) = log(1 - Phi(x)^n1), scalar."""
  from scipy.special import log_ndtr
  if x < 30.0:
    y = n1 * float(log_ndtr(x))
    if y > -math.log(2.0):
      return math.log(-math.expm1(y))
    return math.log1p(-math.exp(y))
  # Phi(x)^n1 == 1 in float64: 1 - Phi^n1 = n1*Phi(-x)*(1 + O(Phi(-x))).
  return math.log(n1) + float(log_ndtr(-x))


def _integrate_log_concave(logf, lo, hi):
  """log of the integral of exp(logf) over R for a log-concave f with
  logf'' <= -1 and its mode in [lo, hi].

  Finds the mode, then integrates exp(logf - logf(mode)) over mode +- 40
  (the rest is below exp(-800) relative), with break points at multiples
  of the local width so that quad resolves sharp peaks.
  """
  from scipy.integrate import quad
  from scipy.optimize import minimize_scalar
  res = minimize_scalar(lambda t: -logf(t), bounds=(lo, hi),
                        method='bounded',
                        options={'xatol': 1e-10, 'maxiter': 2000})
  m = float(res.x)
  lmax = logf(m)
  h = 1e-3
  curv = -(logf(m + h) - 2.0 * lmax + logf(m - h)) / (h * h)
  width = 1.0 / math.sqrt(max(curv, 1.0))
  a, b = m - 40.0, m + 40.0
  pts = sorted({m + s * width * c for s in (-1, 1)
                for c in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)} | {m})
  pts = [p for p in pts if a < p < b]
  import warnings
  from scipy.integrate import IntegrationWarning
  f = lambda t: math.exp(logf(t) - lmax)
  for epsrel in (1e-12, 1e-10):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always', IntegrationWarning)
      val, _ = quad(f, a, b, points=pts, epsabs=0.0, epsrel=epsrel,
                    limit=1000)
    # A result far below the float64 range needs no accuracy (|t| is then
    # so large that logf itself carries roundoff).
    if not caught or lmax + math.log(val) < -700.0:
      return lmax + math.log(val)
  raise FloatingPointError(f'quadrature did not converge: {caught[0].message}')


@functools.lru_cache(maxsize=1 << 16)
def _pt_scalar(gamma, vocab_size):
  """(pt, 1 - pt, log(-dpt/dgamma)) for one finite gamma.

  With t = u - nu (docs/math.md §1):
    pt            = int phi(t) Phi(t+nu)^(K-1) dt
    1 - pt        = int phi(t) (1 - Phi(t+nu)^(K-1)) dt
    -dpt/dgamma   = (nu/2) (K-1) int phi(t) phi(t+nu) Phi(t+nu)^(K-2) dt
  (the last is d/dnu of the first times dnu/dgamma = -nu/2). All three
  integrands are log-concave; the smaller of pt, 1-pt is integrated and
  the other is its complement.
  """
  from scipy.special import log_ndtr, ndtri
  K = int(vocab_size)
  n1 = K - 1
  nu = math.exp(-gamma / 2.0)
  # Median of the max M of K-1 normals: pt > 1/2 roughly iff nu > m_med.
  m_med = -float(ndtri(-math.expm1(-math.log(2.0) / n1)))
  if nu <= m_med:
    log_pt = _integrate_log_concave(
      lambda t: -0.5 * t * t - 0.5 * _LOG_2PI + n1 * float(log_ndtr(t + nu)),
      -1.0, 40.0)
    pt = math.exp(log_pt)
    q = -math.expm1(log_pt)
  else:
    log_q = _integrate_log_concave(
      lambda t: -0.5 * t * t - 0.5 * _LOG_2PI + _log_sf_max(t + nu, n1),
      -0.5 * nu - 40.0, 0.0)
    q = math.exp(log_q)
    pt = -math.expm1(log_q)
  log_g = _integrate_log_concave(
    lambda t: (-0.5 * t * t - 0.5 * (t + nu) ** 2 - _LOG_2PI
               + (n1 - 1) * float(log_ndtr(t + nu))),
    -0.5 * nu - 1.0, 40.0)
  log_neg_dpt = math.log(0.5 * nu) + math.log(n1) + log_g
  return pt, q, log_neg_dpt


def _pt_q_dpt(gamma, vocab_size):
  """Scalar (pt, 1 - pt, dpt/dgamma), also for infinite gamma."""
  gamma = float(gamma)
  if gamma == -math.inf:
    return 1.0, 0.0, 0.0
  if gamma == math.inf:
    return 1.0 / vocab_size, 1.0 - 1.0 / vocab_size, 0.0
  pt, q, log_neg_dpt = _pt_scalar(gamma, int(vocab_size))
  return pt, q, -math.exp(log_neg_dpt) if log_neg_dpt > -760 else -0.0


def _map_scalar(fn, gamma, n_out):
  """Apply a scalar fn returning n_out floats elementwise; float64 tensors."""
  g = _f64(gamma)
  rows = [fn(v) for v in g.detach().cpu().reshape(-1).tolist()]
  return [torch.tensor([r[i] for r in rows], dtype=_F64).reshape(g.shape)
          .to(g.device) for i in range(n_out)]


def pt_from_gamma(gamma, vocab_size):
  """pt = P(argmax(a~ e_x + s~ eps) = x) and d pt / d gamma (docs/math.md §1)."""
  pt, _, dpt = _map_scalar(lambda v: _pt_q_dpt(v, vocab_size), gamma, 3)
  return pt, dpt


def gamma_to_alpha(gamma, vocab_size):
  """The operator T: alpha = (K pt - 1)/(K - 1) and d alpha / d gamma.

  Adaptive quadrature in float64 (scipy.integrate.quad) for any K >= 2 and
  any gamma (+-inf included). alpha is formed from 1 - pt when pt > 1/2 so
  that 1 - alpha keeps its relative accuracy near alpha = 1.
  """
  K = int(vocab_size)

  def one(v):
    pt, q, dpt = _pt_q_dpt(v, K)
    if q < 0.5:
      alpha = 1.0 - K * q / (K - 1)       # 1 - alpha = K (1 - pt) / (K - 1)
    else:
      alpha = (K * pt - 1.0) / (K - 1)
    return alpha, K / (K - 1) * dpt

  return tuple(_map_scalar(one, gamma, 2))


def loglinear_alpha(t, eps=SCHEDULE_EPS):
  """trainer_base.LogLinear: alpha = 1 - (1 - eps) t, dalpha/dt = -(1 - eps)."""
  t = _f64(t)
  return 1.0 - (1.0 - eps) * t, torch.full_like(t, -(1.0 - eps))


def cosine_alpha(t, eps=SCHEDULE_EPS, *, reference_dalpha=False):
  """trainer_base.Cosine: alpha = 1 - cos(pi/2 (1 - (1 - eps) t)).

  dalpha/dt = -(pi/2)(1 - eps) sin(pi/2 (1 - (1 - eps) t)). The reference
  returns it without the chain-rule factor (1 - eps); reference_dalpha=True
  reproduces that.
  """
  t = _f64(t)
  arg = 0.5 * math.pi * (1.0 - (1.0 - eps) * t)
  dalpha = -0.5 * math.pi * torch.sin(arg)
  if not reference_dalpha:
    dalpha = dalpha * (1.0 - eps)
  return 1.0 - torch.cos(arg), dalpha


def gamma_schedule(t, vocab_size, gamma_min=DUO_GAMMA_MIN,
                   gamma_max=DUO_GAMMA_MAX):
  """Duo schedule: gamma_t = gamma_min + t (gamma_max - gamma_min),
  alpha = T(gamma_t), dalpha/dt = (gamma_max - gamma_min) dalpha/dgamma."""
  t = _f64(t)
  alpha, dalpha_dgamma = gamma_to_alpha(
    gamma_min + t * (gamma_max - gamma_min), vocab_size)
  return alpha, (gamma_max - gamma_min) * dalpha_dgamma
