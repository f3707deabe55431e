"""Oracle of curriculum_embed (docs/math.md §2c, §2d): the dense tempered softmax of
the Gaussian latent times the embedding."""

import torch

from ._common import _F64, _per_token, _scales


def curriculum_embed_dense(x0, gamma, inv_tau, embedding, *, noise=None,
                           generator=None):
  """docs/math.md §2d: w = a~ onehot(x) + s~ noise, P = softmax(w * inv_tau),
  h = P @ E (float64, differentiable w.r.t. embedding), z_t = argmax w.

  noise [B, L, K] standard normal, drawn from generator when None (the
  same draw as sample_zt_dense with the same generator state).
  """
  K = embedding.shape[0]
  if noise is None:
    noise = torch.randn(*x0.shape, K, generator=generator, dtype=_F64,
                        device=x0.device)
  a, s = _scales(_per_token(gamma, x0))
  w = (a[..., None] * torch.nn.functional.one_hot(x0, K).to(_F64)
       + s[..., None] * noise.to(_F64))
  P = torch.softmax(w * _per_token(inv_tau, x0)[..., None], dim=-1)
  return P @ embedding.to(_F64), w.argmax(-1)


# The oracle under the op's name: the dense definition.
curriculum_embed = curriculum_embed_dense
