"""Oracle of curriculum_topk and curriculum_topk_embed (docs/math.md §2e)."""

import math
from dataclasses import dataclass

import torch

from ._common import _F64, _ndtri_upper, _per_token, _scales, _uniform_open


@dataclass
class TopKDraws:
  """The random inputs of the top-k curriculum (docs/math.md §2e), per token.

  u:     [B, L, k] uniforms in (0, 1) for the order statistics (step 1)
  xi:    [B, L]    standard normal of the x-entry (step 2)
  ranks: [B, L, k] int64, distinct ids != x0, the id given to the i-th
         largest kept entry (step 5; the last is replaced by x if in_topk)
  """
  u: torch.Tensor
  xi: torch.Tensor
  ranks: torch.Tensor


def _random_ordered_ids(x0, k, vocab_size, generator):
  """Uniformly random ordered k-tuple of distinct ids != x0 (per token)."""
  shape, dev = x0.shape, x0.device
  out = torch.empty(*shape, k, dtype=torch.long, device=dev)
  for i in range(k):
    # Position i: uniform over the ids not yet used (by rejection).
    cand = torch.randint(0, vocab_size - 1, shape, generator=generator,
                         device=dev)
    while True:
      dup = (out[..., :i] == cand[..., None]).any(-1)
      if not bool(dup.any()):
        break
      cand[dup] = torch.randint(0, vocab_size - 1, (int(dup.sum()),),
                                generator=generator, device=dev)
    out[..., i] = cand
  return out + (out >= x0[..., None]).long()   # skip x0: [0, K-2] -> ids != x


def draw_topk(x0, k, vocab_size, generator=None):
  """Draw the TopKDraws for curriculum_topk from a generator."""
  u = _uniform_open((*x0.shape, k), generator, x0.device)
  xi = torch.randn(x0.shape, generator=generator, dtype=_F64,
                   device=x0.device)
  return TopKDraws(u, xi, _random_ordered_ids(x0, k, vocab_size, generator))


def curriculum_topk(x0, gamma, inv_tau, k, vocab_size, *, zt_rule="exact",
                    generator=None, draws=None):
  """Duo++ efficient curriculum, docs/math.md §2e step by step.

  Returns (ids [B, L, k] int64, weights [B, L, k] float64, z_t [B, L]).
  Entry i of ids/weights: the i-th largest of the K-1 zero-mean entries,
  except that the last one is x when the x-entry is in the top k.
  zt_rule="exact": z_t = x iff e_x > o_1 (P(z_t = x) = pt(gamma));
  zt_rule="reference": z_t = x iff in_topk, as in utils.sample_tempered_softmax_topk.
  """
  K, k = int(vocab_size), int(k)
  if not 1 <= k <= K - 1:
    raise ValueError(f"need 1 <= k <= K-1, got k={k}, K={K}")
  if zt_rule not in ("exact", "reference"):
    raise ValueError(zt_rule)
  if draws is None:
    draws = draw_topk(x0, k, K, generator)
  a, s = _scales(_per_token(gamma, x0))
  inv_tau = _per_token(inv_tau, x0)
  n_others = K - 1

  # 1. top-k order statistics of N' = K-1 iid s~ N(0,1) (Renyi):
  #    log V_i = sum_{r<=i} log U_r / (N' - r + 1),  o_i = s~ Phi^-1(V_i).
  r = torch.arange(1, k + 1, dtype=_F64, device=x0.device)
  log_v = torch.cumsum(torch.log(draws.u.to(_F64)) / (n_others - r + 1), -1)
  o = s[..., None] * _ndtri_upper(log_v)

  # 2. x-entry and the kept set.
  e_x = a + s * draws.xi.to(_F64)
  in_topk = e_x > o[..., -1]
  kept = o.clone()
  kept[..., -1] = torch.where(in_topk, e_x, o[..., -1])
  c_prev = o[..., -2] if k >= 2 else torch.full_like(e_x, math.inf)
  c = torch.where(in_topk, c_prev, o[..., -1])
  n = torch.where(in_topk, torch.full_like(e_x, K - k),
                  torch.full_like(e_x, K - k - 1))

  # 3. tail mean E[exp(X/tau) | X < c], X ~ N(0, s~^2):
  #    log mu = S^2/2 + log Phi((c/tau - S^2)/S) - log Phi((c/tau)/S), S = s~/tau.
  S = s * inv_tau
  ct = c * inv_tau
  log_mu = (0.5 * S * S + torch.special.log_ndtr((ct - S * S) / S)
            - torch.special.log_ndtr(ct / S))
  log_tail = torch.where(n > 0, torch.log(n) + log_mu,
                         torch.full_like(log_mu, -math.inf))

  # 4. normalizer and weights; one-hot on the largest if all underflow.
  log_kept = kept * inv_tau[..., None]
  log_ex = torch.where(in_topk, torch.full_like(e_x, -math.inf), e_x * inv_tau)
  log_z = torch.logsumexp(
    torch.cat([log_kept, log_tail[..., None], log_ex[..., None]], -1), -1)
  weights = torch.exp(log_kept - log_z[..., None])
  # "Underflow" in the dtype the op returns its weights in (float32): below
  # ~1e-45 a float64 weight is still positive but the op's is 0 (found by the
  # fuzzer at k = 1 with a large inv_tau, where the tail term dwarfs e_x / tau).
  zero = (weights.to(torch.float32) == 0).all(-1)
  if bool(zero.any()):
    onehot = torch.nn.functional.one_hot(kept.argmax(-1), k).to(_F64)
    weights = torch.where(zero[..., None], onehot, weights)

  # 5. ids: the random ordered tuple; x takes the last slot if in_topk.
  ids = draws.ranks.clone()
  ids[..., -1] = torch.where(in_topk, x0, ids[..., -1])

  # 7. the discrete latent.
  x_wins = (e_x > o[..., 0]) if zt_rule == "exact" else in_topk
  z_t = torch.where(x_wins, x0, draws.ranks[..., 0])
  return ids, weights, z_t


def curriculum_topk_embed(x0, gamma, inv_tau, k, embedding, *,
                          zt_rule="exact", generator=None, draws=None):
  """docs/math.md §2e step 6: h = sum_i w_i E[id_i] (float64, differentiable w.r.t.
  embedding). Returns (h [B, L, d], z_t)."""
  ids, weights, z_t = curriculum_topk(
    x0, gamma, inv_tau, k, embedding.shape[0], zt_rule=zt_rule,
    generator=generator, draws=draws)
  h = (weights[..., None] * embedding.to(_F64)[ids]).sum(-2)
  return h, z_t
