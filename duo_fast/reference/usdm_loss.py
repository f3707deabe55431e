"""Oracle of usdm_loss (docs/math.md §3): the uniform-state NELBO per token."""

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


def usdm_loss(logits, z, x0, alpha, dalpha):
  """docs/math.md §3 from raw logits: log_x_theta = log_softmax(logits) in float64."""
  return usdm_loss_from_log_probs(torch.log_softmax(logits.to(_F64), -1),
                                  z, x0, alpha, dalpha)
