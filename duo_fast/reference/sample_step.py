"""Oracle of sample_step and posterior (docs/math.md §4): the dense reverse posterior
and a categorical draw from it."""

import math

import torch

from ._common import _F64, _per_token


def nucleus_filter(log_probs, top_p):
  """utils.top_k_top_p_filtering(top_k=0, top_p) on normalized log-probs.

  Sort descending (stable: among ties the lower id comes first); keep the
  token at sorted rank r iff the mass of ranks < r is <= top_p (so the
  kept set is the shortest prefix with mass > top_p, rank 0 always kept);
  drop the rest to -inf and renormalize (log(p / sum p)). A no-op unless
  0 < top_p < 1 (the reference only filters when p_nucleus < 1).
  """
  lp = log_probs.to(_F64)
  if not 0.0 < top_p < 1.0:
    return lp
  sorted_lp, order = torch.sort(lp, dim=-1, descending=True, stable=True)
  cum = torch.cumsum(torch.softmax(sorted_lp, -1), -1)
  drop_sorted = torch.zeros_like(cum, dtype=torch.bool)
  drop_sorted[..., 1:] = cum[..., :-1] > top_p
  drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)
  p = lp.masked_fill(drop, -math.inf).exp()
  return torch.log(p / p.sum(-1, keepdim=True))


def _posterior_from_p(p, z, alpha_t, alpha_s):
  """trainer DUO_BASE._posterior_from_x0 with x0 = p (docs/math.md §4)."""
  K = p.shape[-1]
  at = alpha_t[..., None]
  as_ = alpha_s[..., None]
  onehot_z = torch.nn.functional.one_hot(z, K).to(_F64)
  p_z = p.gather(-1, z[..., None])
  num = (K * at * p_z * onehot_z + (at / as_ - at) * onehot_z
         + (as_ - at) * p + (1 - at / as_) * (1 - as_) / K)
  return num / (K * at * p_z + 1 - at)


def posterior(logits, z, alpha_t, alpha_s, *, kappa=1.0, temperature=1.0,
              top_p=1.0):
  """Dense q(z_s) [B, L, K] float64 (docs/math.md §4).

  p = nucleus_filter(log_softmax(logits / temperature), top_p).exp();
  q = kappa q_post(alpha_s) + (1 - kappa)(alpha_s q_post(1) + (1 - alpha_s)/K)
  (the Psi-sampler mix of trainer_base._psi_update; kappa = 1 is ancestral).
  """
  K = logits.shape[-1]
  lp = torch.log_softmax(logits.to(_F64) / temperature, -1)
  p = nucleus_filter(lp, top_p).exp()
  at = _per_token(alpha_t, z)
  as_ = _per_token(alpha_s, z)
  q = _posterior_from_p(p, z, at, as_)
  kappa = _per_token(kappa, z)
  if bool((kappa != 1).any()):
    q_x0 = _posterior_from_p(p, z, at, torch.ones_like(at))
    pc = as_[..., None] * q_x0 + (1 - as_[..., None]) / K
    q = kappa[..., None] * q + (1 - kappa[..., None]) * pc
  return q


def sample_categorical(probs, generator=None):
  """Exponential race in float64: argmax_j p_j / E_j, E_j = -log(1 - U_j) ~ Exp(1)
  (trainer_base.sample_categorical without its 1e-10 offsets; U has 53 bits)."""
  p = probs.to(_F64)
  u = torch.rand(p.shape, generator=generator, dtype=_F64, device=p.device)
  e = (-torch.log1p(-u)).clamp_min(1e-300)
  return (p / e).argmax(-1)


def sample_step(logits, z, alpha_t, alpha_s, *, kappa=1.0, temperature=1.0,
                top_p=1.0, generator=None):
  """One reverse step: z_s ~ posterior(...)."""
  return sample_categorical(
    posterior(logits, z, alpha_t, alpha_s, kappa=kappa,
              temperature=temperature, top_p=top_p), generator)
