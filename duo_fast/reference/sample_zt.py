"""Oracle of sample_zt (docs/math.md §2a, §2b): the dense argmax over K noises, the
latent's marginal and the coupled pair's exact joint law."""

import torch

from ._common import _F64, _f64, _ndtri_upper, _per_token, _scales, _uniform_open
from .gamma_to_alpha import _map_scalar, _pt_q_dpt, pt_from_gamma


def sample_zt_dense(x0, gamma, vocab_size, gamma_s=None, generator=None):
  """Dense reference (docs/math.md §2, §2b): z = argmax_j (a~ onehot(x) + s~ eps)_j with
  eps [B, L, K] ~ N(0, I). With gamma_s, the same eps gives (z_t, z_s)."""
  K = int(vocab_size)
  eps = torch.randn(*x0.shape, K, generator=generator, dtype=_F64,
                    device=x0.device)
  onehot = torch.nn.functional.one_hot(x0, K).to(_F64)

  def latent(g):
    a, s = _scales(_per_token(g, x0))
    return (a[..., None] * onehot + s[..., None] * eps).argmax(-1)

  z_t = latent(gamma)
  return z_t if gamma_s is None else (z_t, latent(gamma_s))


def latent_marginal(x0, gamma, vocab_size):
  """P(z = x) = pt(gamma) per token [B, L]; every other id has (1 - pt)/(K - 1)."""
  pt, _ = pt_from_gamma(_per_token(gamma, x0), vocab_size)
  return pt


def coupled_joint_law(gamma_t, gamma_s, vocab_size):
  """Exact law of the coupled pair of docs/math.md §2b.

  Returns P[..., a, b] = P([z_t == x] == a, [z_s == x] == b) (float64,
  shape broadcast(gamma_t, gamma_s) + [2, 2]). With A = {nu + eps_x > M}:
    P[1,1] = pt(min(nu_t, nu_s)),  P[0,0] = 1 - pt(max(nu_t, nu_s)),
    P[1,0] = pt_t - P[1,1],        P[0,1] = pt_s - P[1,1].
  When both differ from x they are the same token j* (holder of M), so
  P[0,0] is also P(z_t == z_s != x).
  """
  gt, gs = torch.broadcast_tensors(_f64(gamma_t), _f64(gamma_s))
  pt_t, q_t, _ = _map_scalar(lambda v: _pt_q_dpt(v, vocab_size), gt, 3)
  pt_s, q_s, _ = _map_scalar(lambda v: _pt_q_dpt(v, vocab_size), gs, 3)
  p11 = torch.minimum(pt_t, pt_s)
  p00 = torch.minimum(q_t, q_s)
  p10 = (pt_t - p11).clamp_min(0)
  p01 = (pt_s - p11).clamp_min(0)
  return torch.stack([torch.stack([p00, p01], -1),
                      torch.stack([p10, p11], -1)], -2)


def sample_zt_o1(x0, gamma, vocab_size, gamma_s=None, generator=None):
  """O(1) sampler of docs/math.md §2a/§2b from (eps_x, M, j*) per token:
  M = -Phi^-1(-expm1(log(U)/(K-1))), j* uniform over ids != x,
  z = x if nu + eps_x > M else j*."""
  K = int(vocab_size)
  dev = x0.device
  eps_x = torch.randn(x0.shape, generator=generator, dtype=_F64, device=dev)
  u = _uniform_open(x0.shape, generator, dev)
  r = torch.randint(0, K - 1, x0.shape, generator=generator, device=dev)
  m = _ndtri_upper(torch.log(u) / (K - 1))
  j_star = r + (r >= x0).long()

  def latent(g):
    nu = torch.exp(-0.5 * _per_token(g, x0))
    return torch.where(nu + eps_x > m, x0, j_star)

  z_t = latent(gamma)
  return z_t if gamma_s is None else (z_t, latent(gamma_s))


# The oracle under the op's name: the dense definition (argmax over K noises).
sample_zt = sample_zt_dense
