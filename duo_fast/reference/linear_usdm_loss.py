"""Oracle of linear_usdm_loss (docs/math.md §3): usdm_loss of the output layer's
logits hidden @ weight.T + bias, formed in full in float64."""

from ._common import _F64
from .usdm_loss import usdm_loss


def linear_usdm_loss(hidden, weight, bias, z, x0, alpha, dalpha):
  """Per-token NELBO [B, L] of logits = hidden @ weight.T + bias (bias may be None),
  in float64, differentiable w.r.t. hidden, weight and bias."""
  logits = hidden.to(_F64) @ weight.to(_F64).t()
  if bias is not None:
    logits = logits + bias.to(_F64)
  return usdm_loss(logits, z, x0, alpha, dalpha)
