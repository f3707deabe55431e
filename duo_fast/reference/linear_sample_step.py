"""Oracle of linear_sample_step (docs/math.md §4): the reverse step on the output
layer's logits hidden @ weight.T + bias formed in full in float64, and the Duo
code's classifier-free guided posterior."""

import torch

from ._common import _per_token
from .linear_distill_kl import _logits
from .sample_step import posterior, sample_categorical


def guided_posterior(cond_logits, uncond_logits, z, alpha_t, alpha_s,
                     guid_weight, *, kappa=1.0, temperature=1.0, top_p=1.0):
  """Classifier-free guided q(z_s) [B, L, K] float64
  (trainer_base._get_guided_posterior_from_xt, and _psi_update around it).

  guided(a) = softmax(w log q_c + (1 - w) log q_u) with q_c, q_u the
  posteriors (kappa = 1, level a) of the conditional and unconditional
  logits, w = guid_weight, and -1e6 (the Duo code's neg_infinity) where
  either posterior is 0; q = guided(alpha_s), and for kappa < 1
  q = kappa guided(alpha_s) + (1 - kappa)(alpha_s guided(1) + (1 - alpha_s)/K).
  """
  def guided(a_s):
    lc = posterior(cond_logits, z, alpha_t, a_s, temperature=temperature,
                   top_p=top_p).log()
    lu = posterior(uncond_logits, z, alpha_t, a_s, temperature=temperature,
                   top_p=top_p).log()
    g = guid_weight * lc + (1 - guid_weight) * lu
    return torch.softmax(g.masked_fill(lc.isinf() | lu.isinf(), -1e6), -1)

  as_ = _per_token(alpha_s, z)
  q = guided(as_)
  if kappa != 1.0:
    K = cond_logits.shape[-1]
    pc = as_[..., None] * guided(torch.ones_like(as_)) + (1 - as_[..., None]) / K
    q = kappa * q + (1 - kappa) * pc
  return q


def linear_sample_step(hidden, weight, bias, z, alpha_t, alpha_s, *, kappa=1.0,
                       temperature=1.0, top_p=1.0, guidance=None, generator=None):
  """One reverse step on logits = hidden @ weight.T + bias (bias may be None):
  z_s ~ posterior(...), or ~ guided_posterior(...) with guidance =
  (uncond_hidden, guid_weight) through the same output layer."""
  logits = _logits(hidden, weight, bias)
  kw = dict(kappa=kappa, temperature=temperature, top_p=top_p)
  if guidance is None:
    q = posterior(logits, z, alpha_t, alpha_s, **kw)
  else:
    uncond = _logits(guidance[0], weight, bias)
    q = guided_posterior(logits, uncond, z, alpha_t, alpha_s, guidance[1], **kw)
  return sample_categorical(q, generator)
