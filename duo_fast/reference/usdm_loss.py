"""Oracle of usdm_loss (docs/math.md §3): the uniform-state NELBO per token.

Two float64 forms. ``usdm_loss_from_log_probs`` is the Duo code's formula
(``DUO_BASE.nll_per_token``), term by term: it subtracts terms of size ~K |log(1 -
alpha)| to get the loss, so a tiny loss (a near-perfect model, alpha near 0 or 1,
small K) comes back with few or no correct digits. ``usdm_loss`` is the
cancellation-free form of docs/math.md §3 (every term vanishes for a perfect
model): the oracle of the kernels, checked against a 80-digit evaluation of the
Duo formula (tests/test_reference.py).""" 

import torch

from ._common import _F64, _per_token


def usdm_loss_from_log_probs(log_probs, z, x0, alpha, dalpha):
  """Per-token continuous-time NELBO [B, L] (docs/math.md §3, DUO_BASE.nll_per_token).

  Equals coeff * (term1 - term2) with
    term2 = sum_{j != z} (xbar_j / xbar_z) log(xb_z xbar_j / (xb_j xbar_z)),
  xbar = K alpha onehot(x) + 1 - alpha the true marginal, xb the model's.
  """
  lp = log_probs.to(_F64)
  K = lp.shape[-1]
  alpha = _per_token(alpha, z)
  dalpha = _per_token(dalpha, z)
  p = lp.exp()
  xb = K * alpha[..., None] * p + (1 - alpha)[..., None]   # model marginal
  log_xb = xb.log()
  log_xb_z = log_xb.gather(-1, z[..., None]).squeeze(-1)
  log_xb_x = log_xb.gather(-1, x0[..., None]).squeeze(-1)
  xb_z = xb.gather(-1, z[..., None]).squeeze(-1)
  e = (x0 == z).to(_F64)
  xbar_z = (1 - alpha) + K * alpha * e                      # true marginal at z
  coeff = dalpha / (K * alpha)
  term1 = K * (1 / xbar_z - 1 / xb_z)
  c = (1 - alpha) / (K * alpha + 1 - alpha)
  A = c * e + (1 - e)
  offset = ((K - 1) * c * e - (1 / c) * (1 - e)) * torch.log(c)
  S = log_xb.sum(-1)
  term2 = (-A * (S - K * log_xb_z)
           - (1 - e) * (K * alpha / (1 - alpha)) * (log_xb_x - log_xb_z)
           + offset)
  return coeff * (term1 - term2)


def _sum_except(v, idx):
  """sum_{j != idx} v_j, summed (not sum - v_idx: no cancellation when v_idx dominates)."""
  keep = torch.ones_like(v, dtype=torch.bool).scatter_(-1, idx[..., None], False)
  return torch.where(keep, v, torch.zeros_like(v)).sum(-1)


def _log1p_minus(u):
  """log1p(u) - u for u >= 0, to full float64 relative accuracy: its Taylor series
  below 0.25 (41 terms: the remainder is < 0.25^40 of the sum), log1p(u) - u above."""
  small = u < 0.25
  us = torch.where(small, u, torch.zeros_like(u))  # no overflow in the unused branch
  acc = torch.zeros_like(us)
  for k in range(42, 1, -1):  # Horner: sum_{k>=2} (-1)^(k+1) u^k / k
    acc = acc * us + (-1) ** (k + 1) / k
  series = acc * us * us
  return torch.where(small, series, torch.log1p(u) - u)


def usdm_loss_value(logits, z, x0, alpha, dalpha):
  """docs/math.md §3 from raw logits in a cancellation-free form, float64. Equal to the Duo formula
  (usdm_loss_from_log_probs) in exact arithmetic, but every term below is of the
  loss's own order and of one sign, so a tiny loss keeps full relative accuracy.
  With p = softmax(logits), r = K alpha / (1 - alpha), u_j = r p_j, P_y = sum_{j != y}
  p_j (summed), w_y = r P_y / (1 + r p_y), lm(u) = log1p(u) - u and
  V_y = r^2 P_y^2 / (1 + r p_y):
    x != z: T = -(K + r) (lm(u_z) + u_z^2 / (1 + u_z)) + sum_{j != x} lm(u_j)
                - (1 + r) lm(w_x) - V_x
    x == z: T = [(K - 1) lm(w_z) + sum_{j != z} lm(u_j) - V_z] / (1 + r)
  and loss = dalpha / (K alpha) T. (From docs/math.md §3's form with S_y = sum_{j != y}
  log1p(u_j), D_y = log1p(w_y): the first-order parts cancel exactly, e.g.
  r P_y - (1 + r) w_y = -V_y since 1 - p_y = P_y.)
  """
  p = torch.softmax(logits.to(_F64), -1)
  K = p.shape[-1]
  alpha = _per_token(alpha, z)
  dalpha = _per_token(dalpha, z)
  r = K * alpha / (1 - alpha)
  u = r[..., None] * p
  lm = _log1p_minus(u)
  at = lambda v, i: v.gather(-1, i[..., None]).squeeze(-1)  # noqa: E731
  u_z, p_z, p_x = at(u, z), at(p, z), at(p, x0)
  P_x, P_z = _sum_except(p, x0), _sum_except(p, z)
  w_x, w_z = r * P_x / (1 + r * p_x), r * P_z / (1 + r * p_z)
  V_x, V_z = r * r * P_x * P_x / (1 + r * p_x), r * r * P_z * P_z / (1 + r * p_z)
  t_diff = (-(K + r) * (at(lm, z) + u_z * u_z / (1 + u_z)) + _sum_except(lm, x0)
            - (1 + r) * _log1p_minus(w_x) - V_x)
  t_same = ((K - 1) * _log1p_minus(w_z) + _sum_except(lm, z) - V_z) / (1 + r)
  T = torch.where(x0 == z, t_same, t_diff)
  return dalpha / (K * alpha) * T


def _duo_form(logits, z, x0, alpha, dalpha):
  return usdm_loss_from_log_probs(torch.log_softmax(logits.to(_F64), -1), z, x0, alpha, dalpha)


class _UsdmLoss(torch.autograd.Function):
  """Value from usdm_loss_value, gradient by autograd of the Duo formula: each form
  where it is the more accurate one (the value of the Duo formula cancels terms of
  size ~K |log(1 - alpha)|; the autograd of the cancellation-free form cancels
  r^2-sized terms in the softmax Jacobian at a dominant entry, r = K alpha/(1 - alpha))."""

  @staticmethod
  def forward(ctx, logits, z, x0, alpha, dalpha):
    ctx.save_for_backward(logits, z, x0, alpha, dalpha)
    return usdm_loss_value(logits, z, x0, alpha, dalpha)

  @staticmethod
  def backward(ctx, grad_loss):
    logits, z, x0, alpha, dalpha = ctx.saved_tensors
    with torch.enable_grad():
      lg = logits.detach().requires_grad_()
      (g,) = torch.autograd.grad(_duo_form(lg, z, x0, alpha, dalpha), lg, grad_loss,
                                 create_graph=torch.is_grad_enabled())
    return g, None, None, None, None


def usdm_loss(logits, z, x0, alpha, dalpha):
  """docs/math.md §3 from raw logits, float64: the value of usdm_loss_value (the
  cancellation-free form: within 1e-10 relative of an 80-digit evaluation on the
  hard rows of tests/test_reference.py), the gradient w.r.t. the logits by autograd
  of the Duo formula (exact to ~1e-14 |dalpha| (1 + r) absolute)."""
  lg = logits.to(_F64)
  alpha, dalpha = _per_token(alpha, z), _per_token(dalpha, z)
  return _UsdmLoss.apply(lg, z, x0, alpha, dalpha)
