"""Tests of duo_fast.reference against closed forms, exact enumeration and
independent computations (mpmath, scipy, brute-force matrices).

Statistical tests use fixed seeds; a frequency passes when its z-score is
below 5 (or a chi-square p-value above 1e-5), so a correct implementation
fails with probability < 1e-5 per check for a fresh seed, and never for
the fixed ones.
"""

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

try:
  from duo_fast import reference as R
except Exception:  # the package __init__ may need the compiled extension
  _path = pathlib.Path(__file__).resolve().parents[1] / "duo_fast" / "reference.py"
  _spec = importlib.util.spec_from_file_location("duo_fast_reference", _path)
  R = importlib.util.module_from_spec(_spec)
  _spec.loader.exec_module(R)

F64 = torch.float64
Z_MAX = 5.0
P_MIN = 1e-5


def gen(seed):
  return torch.Generator().manual_seed(seed)


def zscore(count, n, p):
  return abs(count - n * p) / math.sqrt(n * p * (1 - p))


def chi2_pvalue(counts, probs):
  counts = np.asarray(counts, dtype=np.float64)
  expected = np.asarray(probs, dtype=np.float64) * counts.sum()
  keep = expected > 0
  assert counts[~keep].sum() == 0, "count in a zero-probability cell"
  stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
  return stats.chi2.sf(stat, keep.sum() - 1)


def nu_of(gamma):
  return math.exp(-gamma / 2)


# --------------------------------------------------------------------------
# Section 1: the operator
# --------------------------------------------------------------------------

def test_alpha_k2_closed_form():
  # K=2: pt = P(nu + e1 > e2) = Phi(nu / sqrt 2), dpt/dnu = phi(nu/sqrt2)/sqrt2.
  g = torch.linspace(-20, 20, 161, dtype=F64)
  alpha, dalpha = R.gamma_to_alpha(g, 2)
  nu = torch.exp(-g / 2)
  h = nu / math.sqrt(2)
  alpha_ex = 2 * special.ndtr(h.numpy()) - 1
  dalpha_ex = 2 * (-nu / 2) * torch.exp(-h * h / 2) / math.sqrt(2 * math.pi) / math.sqrt(2)
  assert np.abs(alpha.numpy() - alpha_ex).max() <= 1e-13
  m = dalpha_ex.abs() > 1e-280
  rel = ((dalpha - dalpha_ex) / dalpha_ex)[m].abs().max().item()
  assert rel <= 1e-10


def _q_k3(gamma):
  # K=3: pt = P(Y1 > -nu, Y2 > -nu), Y_i = e0 - e_i: bivariate normal, var 2,
  # corr 1/2 -> Phi2(h, h; 1/2) = Phi(h) - 2 T(h, 1/sqrt 3), h = nu/sqrt 2.
  # Returns 1 - pt (accurate also when pt is near 1).
  h = nu_of(gamma) / math.sqrt(2)
  return special.ndtr(-h) + 2 * special.owens_t(h, 1 / math.sqrt(3))


def _pt_k3(gamma):
  return 1 - _q_k3(gamma)


def test_alpha_k3_closed_form_and_2d():
  gammas = np.linspace(-12, 20, 65)
  alpha, dalpha = R.gamma_to_alpha(torch.tensor(gammas), 3)
  for g, a, da in zip(gammas, alpha.tolist(), dalpha.tolist()):
    assert abs(a - (1 - 1.5 * _q_k3(g))) <= 1e-13
    # Richardson central difference of the closed form (scipy's owens_t
    # loses relative accuracy deep in the tail, hence the cut)
    if abs(da) > 1e-12:
      f = lambda hh: (-1.5 * (_q_k3(g + hh) - _q_k3(g - hh))) / (2 * hh)
      fd = (4 * f(1e-3) - f(2e-3)) / 3
      assert abs(da / fd - 1) <= 1e-7
  # Independent 2-D integral: pt = P(e1 < nu + e0, e2 < nu + e0)
  #   = int de0 phi(e0) Phi(nu + e0) int_{e1 < nu + e0} phi(e1) de1.
  for g in (-2.0, 1.0):
    nu = nu_of(g)
    pt2d, _ = integrate.dblquad(
      lambda e1, e0: math.exp(-0.5 * (e0 * e0 + e1 * e1)) / (2 * math.pi) * special.ndtr(nu + e0),
      -12, 12, -12, lambda e0: min(nu + e0, 12.0), epsabs=1e-13, epsrel=1e-12)
    a = R.gamma_to_alpha(g, 3)[0].item()
    assert abs(a - (3 * pt2d - 1) / 2) <= 1e-10
    assert abs(pt2d - _pt_k3(g)) <= 1e-10


def _mp_alpha_dalpha(gamma, K):
  """alpha and dalpha/dgamma with mpmath at 30 digits. The derivative's
  integrand phi(t) phi(t+nu) = exp(-(t+nu/2)^2 - nu^2/4)/(2 pi) is integrated
  without its constant exp(-nu^2/4) (mp.quad's stopping rule is absolute)."""
  import mpmath as mp
  mp.mp.dps = 30
  nu = mp.exp(-mp.mpf(gamma) / 2)
  c = -nu / 2
  pts = sorted(set([mp.mpf(x) for x in range(-16, 17)] + [c + j for j in range(-8, 9)]))
  pt = mp.quad(lambda t: mp.npdf(t) * mp.ncdf(t + nu) ** (K - 1), pts)
  g = mp.quad(lambda t: mp.exp(-(t - c) ** 2) / (2 * mp.pi) * mp.ncdf(t + nu) ** (K - 2), pts)
  return (K * pt - 1) / (K - 1), -(nu / 2) * K * g * mp.exp(-nu * nu / 4)


@pytest.mark.parametrize("K,gamma", [
  (50257, -4.0), (50257, -1.75), (50257, 20.0),
  (2 ** 24, -3.5), (2 ** 24, 0.0), (2 ** 24, -6.0), (7, -20.0 / 3), (3, -7.5)])
def test_alpha_vs_mpmath(K, gamma):
  a_mp, d_mp = _mp_alpha_dalpha(gamma, K)
  a, d = (v.item() for v in R.gamma_to_alpha(gamma, K))
  assert abs(a - float(a_mp)) <= 1e-11
  assert abs(d / float(d_mp) - 1) <= 1e-8


@pytest.mark.parametrize("K", [2, 7, 50257, 2 ** 24])
def test_alpha_limits_monotone(K):
  alpha, dalpha = R.gamma_to_alpha(
    torch.tensor([-math.inf, -20.0, 40.0, math.inf], dtype=F64), K)
  assert alpha[0] == 1 and alpha[3] == 0
  assert abs(alpha[1] - 1) <= 1e-12 and 0 <= alpha[2] <= 1e-8
  g = torch.linspace(-20, 20, 201, dtype=F64)
  alpha, dalpha = R.gamma_to_alpha(g.float(), K)     # float32 input accepted
  assert alpha.dtype == F64 and alpha.shape == g.shape
  assert (alpha >= 0).all() and (alpha <= 1).all()
  assert (alpha[1:] <= alpha[:-1]).all() and (dalpha <= 0).all()
  assert alpha[0] == 1


def test_dalpha_matches_finite_difference():
  K = 50257
  for g in (-4.0, -3.5, -2.6, -1.75, 0.0, 4.0, 10.0):
    a = lambda v: R.gamma_to_alpha(v, K)[0].item()
    f = lambda h: (a(g + h) - a(g - h)) / (2 * h)
    fd = (4 * f(1e-3) - f(2e-3)) / 3
    assert abs(R.gamma_to_alpha(g, K)[1].item() / fd - 1) <= 1e-6


def test_schedules():
  t = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
  a, da = R.loglinear_alpha(t)
  assert torch.allclose(a, 1 - (1 - 1e-3) * t) and (da == -(1 - 1e-3)).all()
  assert a[-1].item() == pytest.approx(1e-3)
  a, da = R.cosine_alpha(t)
  assert a[0] == 0 + (1 - math.cos(math.pi / 2)) and a[-1] > 0
  h = 1e-6
  fd = (R.cosine_alpha(t + h)[0] - R.cosine_alpha(t - h)[0]) / (2 * h)
  assert torch.allclose(da, fd, rtol=1e-8, atol=1e-9)
  _, da_ref = R.cosine_alpha(t, reference_dalpha=True)
  assert torch.allclose(da_ref * (1 - 1e-3), da)
  K = 50257
  a, da = R.gamma_schedule(t, K)
  ag, _ = R.gamma_to_alpha(torch.tensor([R.DUO_GAMMA_MIN, R.DUO_GAMMA_MAX]), K)
  assert a[0] == ag[0] and a[-1] == ag[1]
  fd = (R.gamma_schedule(t[1] + 1e-5, K)[0] - R.gamma_schedule(t[1] - 1e-5, K)[0]) / 2e-5
  assert da[1].item() == pytest.approx(fd.item(), rel=1e-7)
  assert (R.DUO_GAMMA_MIN, R.DUO_GAMMA_MAX) == (-3.5, -1.75)


# --------------------------------------------------------------------------
# Section 2: latents
# --------------------------------------------------------------------------

def _check_marginal(x0, z, gamma_rows, K):
  """Per row: P(z = x) = pt; the other ids uniform."""
  pt = R.latent_marginal(x0, gamma_rows, K)
  for b in range(x0.shape[0]):
    hit = (z[b] == x0[b])
    n = hit.numel()
    assert zscore(hit.sum().item(), n, pt[b, 0].item()) < Z_MAX
    assert (pt[b] == pt[b, 0]).all()
    if K <= 64 and (~hit).sum() >= 100:
      off = ((z[b] - x0[b]) % K)[~hit]
      counts = torch.bincount(off, minlength=K)[1:]
      assert chi2_pvalue(counts.numpy(), np.full(K - 1, 1 / (K - 1))) > P_MIN


def test_dense_sampler_marginal():
  K, B, L = 7, 4, 5000
  g = gen(1)
  x0 = torch.randint(0, K, (B, L), generator=g)
  gamma = torch.tensor([-3.0, -1.0, 0.5, 2.0])
  z = R.sample_zt_dense(x0, gamma, K, generator=g)
  _check_marginal(x0, z, gamma, K)
  # per-token gamma [B, L] gives the same law
  z = R.sample_zt_dense(x0, gamma[:, None].expand(B, L), K, generator=g)
  _check_marginal(x0, z, gamma, K)


@pytest.mark.parametrize("K", [7, 50257, 2 ** 24])
def test_o1_sampler_marginal(K):
  B, L = 4, 50000
  g = gen(2)
  x0 = torch.randint(0, K, (B, L), generator=g)
  gamma = torch.tensor([-4.0, -2.5, -1.0, 3.0])
  z = R.sample_zt_o1(x0, gamma, K, generator=g)
  assert z.dtype == torch.int64 and (z >= 0).all() and (z < K).all()
  _check_marginal(x0, z, gamma, K)
  if K > 64:  # the non-x ids: (z - x) mod K uniform on 1..K-1, in 10 bins
    off = ((z - x0) % K)[z != x0]
    counts = torch.bincount((off - 1) * 10 // (K - 1), minlength=10)
    assert chi2_pvalue(counts.numpy(), np.full(10, 0.1)) > P_MIN


def test_coupled_joint_law_consistency():
  K = 50257
  P = R.coupled_joint_law(torch.tensor([-1.0, -3.0]), torch.tensor([-2.5, -1.5]), K)
  assert P.shape == (2, 2, 2) and torch.allclose(P.sum((-1, -2)), torch.ones(2, dtype=F64))
  pt_t, _ = R.pt_from_gamma(torch.tensor([-1.0, -3.0]), K)
  pt_s, _ = R.pt_from_gamma(torch.tensor([-2.5, -1.5]), K)
  assert torch.allclose(P[:, 1, :].sum(-1), pt_t, atol=1e-15)
  assert torch.allclose(P[:, :, 1].sum(-1), pt_s, atol=1e-15)
  # s less noisy than t: z_t = x implies z_s = x
  assert P[0, 1, 0] == 0 and P[1, 0, 1] == 0


@pytest.mark.parametrize("sampler,K,L", [("dense", 7, 10000), ("o1", 7, 50000),
                                          ("o1", 50257, 50000)])
def test_coupled_pair_law(sampler, K, L):
  g = gen(3)
  B = 2
  x0 = torch.randint(0, K, (B, L), generator=g)
  gamma_t = torch.tensor([-1.0, -2.0])
  gamma_s = torch.tensor([-2.5, -0.5])      # row 1: s noisier than t
  fn = R.sample_zt_dense if sampler == "dense" else R.sample_zt_o1
  z_t, z_s = fn(x0, gamma_t, K, gamma_s=gamma_s, generator=g)
  P = R.coupled_joint_law(gamma_t, gamma_s, K)
  for b in range(B):
    et, es = (z_t[b] == x0[b]).long(), (z_s[b] == x0[b]).long()
    counts = torch.bincount(2 * et + es, minlength=4).numpy()
    assert chi2_pvalue(counts, P[b].reshape(-1).numpy()) > P_MIN
    both = (et == 0) & (es == 0)
    assert (z_t[b][both] == z_s[b][both]).all()   # the same j*
  # the single-level call draws the same law as the pair's first member
  assert z_t.shape == x0.shape


# --------------------------------------------------------------------------
# Section 2d: dense curriculum
# --------------------------------------------------------------------------

def test_curriculum_embed_dense():
  K, B, L, d = 11, 2, 6, 4
  x0 = torch.randint(0, K, (B, L), generator=gen(4))
  E = torch.randn(K, d, generator=gen(5), dtype=torch.float32, requires_grad=True)
  gamma = torch.tensor([-2.0, 0.0])
  h, z = R.curriculum_embed_dense(x0, gamma, 10.0, E, generator=gen(6))
  z_ref = R.sample_zt_dense(x0, gamma, K, generator=gen(6))
  assert torch.equal(z, z_ref) and h.dtype == F64 and h.shape == (B, L, d)
  # explicit softmax with the same noise
  noise = torch.randn(B, L, K, generator=gen(6), dtype=F64)
  a = torch.sigmoid(-gamma).sqrt()[:, None, None]
  s = torch.sigmoid(gamma).sqrt()[:, None, None]
  w = a * torch.nn.functional.one_hot(x0, K) + s * noise
  P = torch.softmax(10.0 * w, -1)
  assert torch.allclose(h, P @ E.double(), atol=1e-14)
  h2, _ = R.curriculum_embed_dense(x0, gamma, 10.0, E, noise=noise)
  assert torch.equal(h, h2)
  # backward: dE = P^T dh
  G = torch.randn(B, L, d, dtype=F64, generator=gen(7))
  (h * G).sum().backward()
  assert torch.allclose(E.grad.double(), torch.einsum("blk,bld->kd", P, G), atol=1e-6)
  # tau -> 0: h -> E[z_t]
  h3, z3 = R.curriculum_embed_dense(x0, gamma, 1e8, E.detach(), noise=noise)
  assert torch.allclose(h3, E.detach().double()[z3], atol=1e-12)


# --------------------------------------------------------------------------
# Section 2e: top-k curriculum
# --------------------------------------------------------------------------

def _order_stats(u, N):
  """Independent: V_i = prod_{r<=i} U_r^(1/(N-r+1)), o_i = Phi^-1(V_i) (numpy)."""
  u = u.numpy()
  k = u.shape[-1]
  V = np.cumprod(u ** (1.0 / (N - np.arange(k))), axis=-1)
  return stats.norm.ppf(V)


def test_topk_tail_mean_formula():
  # log mu = log E[exp(X / tau) | X < c], X ~ N(0, s^2), vs quadrature.
  for s, inv_tau, c in [(0.9, 1.0, 1.5), (0.7, 3.0, 2.0), (0.95, 10.0, 2.6), (0.5, 0.5, -0.3)]:
    num, _ = integrate.quad(lambda x: math.exp(x * inv_tau) * stats.norm.pdf(x, scale=s), -12, c)
    mu = num / stats.norm.cdf(c / s)
    # recover mu from a k=1-of-K=2 call: n = 1 tail entry when x is not kept
    S, ct = s * inv_tau, c * inv_tau
    log_mu = 0.5 * S * S + special.log_ndtr((ct - S * S) / S) - special.log_ndtr(ct / S)
    assert math.exp(log_mu) == pytest.approx(mu, rel=1e-10)


def test_topk_weights_and_ids_vs_dense():
  """With the draws fixed, rebuild the K-vector and compare (k = K - 1: the
  only approximation is one tail entry when x is in the top k)."""
  K, B, L = 9, 2, 3000
  k = K - 1
  g = gen(8)
  x0 = torch.randint(0, K, (B, L), generator=g)
  gamma = torch.tensor([-1.5, 0.5], dtype=F64)
  inv_tau = 2.0
  draws = R.draw_topk(x0, k, K, generator=g)
  ids, w, z = R.curriculum_topk(x0, gamma, inv_tau, k, K, draws=draws)
  ids2, w2, z2 = R.curriculum_topk(x0, gamma, inv_tau, k, K, draws=draws)
  assert torch.equal(ids, ids2) and torch.equal(w, w2) and torch.equal(z, z2)
  s = torch.sigmoid(gamma).sqrt()[:, None].expand(B, L).numpy()
  a = torch.sigmoid(-gamma).sqrt()[:, None].expand(B, L).numpy()
  o = s[..., None] * _order_stats(draws.u, K - 1)
  e_x = a + s * draws.xi.numpy()
  in_topk = e_x > o[..., -1]
  # ranks: distinct ids != x0
  r = draws.ranks
  assert (r != x0[..., None]).all()
  assert (torch.sort(r, -1).values.diff(dim=-1) > 0).all()
  # ids: ranks with x in the last slot iff in_topk
  assert torch.equal(ids[..., :-1], r[..., :-1])
  assert torch.equal(ids[..., -1], torch.where(torch.from_numpy(in_topk), x0, r[..., -1]))
  # not in top k: kept = all K-1 others, x in the normalizer only -> exact softmax
  full = np.zeros((B, L, K))
  np.put_along_axis(full, r.numpy(), o, -1)
  np.put_along_axis(full, x0.numpy()[..., None], e_x[..., None], -1)
  P = special.softmax(full * inv_tau, -1)
  P_ids = np.take_along_axis(P, ids.numpy(), -1)
  assert np.abs(w.numpy()[~in_topk] - P_ids[~in_topk]).max() <= 1e-12
  # in top k: kept = o_1..o_{k-1}, e_x; the entry o_k replaced by its mean below c = o_{k-1}
  S, ct = s * inv_tau, o[..., -2] * inv_tau
  log_mu = 0.5 * S * S + special.log_ndtr((ct - S * S) / S) - special.log_ndtr(ct / S)
  kept = np.concatenate([o[..., :-1], e_x[..., None]], -1) * inv_tau
  Z = np.exp(kept).sum(-1) + np.exp(log_mu)
  w_ex = np.exp(kept) / Z[..., None]
  assert np.abs(w.numpy()[in_topk] - w_ex[in_topk]).max() <= 1e-12
  assert in_topk.sum() > 20 and (~in_topk).sum() > 20
  # exact rule: z = argmax of the rebuilt vector
  assert torch.equal(z, torch.from_numpy(full.argmax(-1)))


def test_topk_zt_rules():
  K, B, L, k = 1000, 2, 20000, 8
  g = gen(9)
  x0 = torch.randint(0, K, (B, L), generator=g)
  gamma = torch.tensor([-3.0, -2.0])
  draws = R.draw_topk(x0, k, K, generator=g)
  _, _, z_ex = R.curriculum_topk(x0, gamma, 100.0, k, K, draws=draws)
  _, _, z_rf = R.curriculum_topk(x0, gamma, 100.0, k, K, zt_rule="reference", draws=draws)
  pt, _ = R.pt_from_gamma(gamma, K)
  for b in range(B):
    n = L
    assert zscore((z_ex[b] == x0[b]).sum().item(), n, pt[b].item()) < Z_MAX
    # reference rule: P(z = x) = P(e_x > o_k) = E_xi[P(Bin(K-1, Phi(-(nu+xi))) <= k-1)]
    nu = nu_of(gamma[b].item())
    p_in, _ = integrate.quad(
      lambda xi: stats.norm.pdf(xi) * stats.binom.cdf(k - 1, K - 1, special.ndtr(-(nu + xi))),
      -12, 12, epsabs=1e-12)
    cnt = (z_rf[b] == x0[b]).sum().item()
    assert zscore(cnt, n, p_in) < Z_MAX
    assert p_in > pt[b].item() + 0.05 and zscore(cnt, n, pt[b].item()) > 20
    # the rules agree when x is not in the top k
    diff = z_ex[b] != z_rf[b]
    assert (z_rf[b][diff] == x0[b][diff]).all()


def test_topk_ids_uniform_at_every_rank():
  # Duo++ reference (Floyd order) never puts ids above K-k-1 (before the
  # shift past x) first; here every id != x is equally likely at every rank.
  K, k, N = 6, 3, 30000
  x0 = torch.full((1, N), 2)
  ids, _, z = R.curriculum_topk(x0, torch.tensor([1.0]), 1.0, k, K, generator=gen(10))
  others = [j for j in range(K) if j != 2]
  for rank in range(k - 1):
    counts = torch.bincount(ids[0, :, rank], minlength=K).numpy()
    assert counts[2] == 0
    assert chi2_pvalue(counts[others], np.full(K - 1, 1 / (K - 1))) > P_MIN
  zc = torch.bincount(z[0][z[0] != 2], minlength=K).numpy()
  assert chi2_pvalue(zc[others], np.full(K - 1, 1 / (K - 1))) > P_MIN


def test_topk_mass_matches_dense_in_expectation():
  # Mean total weight of the k kept entries vs the dense softmax mass of
  # the same k ranks (the tail enters through its expectation only).
  K, k, L = 200, 20, 4000
  gamma = torch.tensor([-2.0])
  inv_tau = 1.5
  x0 = torch.randint(0, K, (1, L), generator=gen(11))
  _, w, _ = R.curriculum_topk(x0, gamma, inv_tau, k, K, generator=gen(12))
  a, s = math.sqrt(special.expit(2.0)), math.sqrt(special.expit(-2.0))
  wv = a * torch.nn.functional.one_hot(x0, K) + s * torch.randn(1, L, K, generator=gen(13), dtype=F64)
  P = torch.softmax(inv_tau * wv, -1)
  # dense analogue of the kept set: top k others, with x swapped in for the k-th if larger
  others = P.masked_fill(torch.nn.functional.one_hot(x0, K).bool(), -1.0)
  top = others.topk(k, -1).values
  px = P.gather(-1, x0[..., None])[..., 0]
  mass = torch.where(px > top[..., -1], top[..., :-1].sum(-1) + px, top.sum(-1))
  m_topk, m_dense = w.sum(-1).mean().item(), mass.mean().item()
  se = math.sqrt(w.sum(-1).var().item() / L + mass.var().item() / L)
  assert abs(m_topk - m_dense) < Z_MAX * se + 0.01 * m_dense


def test_topk_embed_and_edge_cases():
  K, d = 13, 5
  x0 = torch.randint(0, K, (2, 7), generator=gen(14))
  E = torch.randn(K, d, generator=gen(15), requires_grad=True)
  draws = R.draw_topk(x0, 4, K, generator=gen(16))
  ids, w, z = R.curriculum_topk(x0, torch.tensor([-1.0, 1.0]), 3.0, 4, K, draws=draws)
  h, z2 = R.curriculum_topk_embed(x0, torch.tensor([-1.0, 1.0]), 3.0, 4, E, draws=draws)
  bag = torch.nn.functional.embedding_bag(ids.reshape(-1, 4), E.double(),
                                          per_sample_weights=w.reshape(-1, 4), mode="sum")
  assert torch.allclose(h, bag.view(2, 7, d), atol=1e-13) and torch.equal(z, z2)
  h.sum().backward()   # dE[j, :] = sum of the weights given to id j
  per_id = torch.zeros(K, dtype=F64).index_add_(0, ids.reshape(-1), w.reshape(-1))
  assert torch.allclose(E.grad.double(), per_id[:, None].expand(K, d), atol=1e-6)
  assert ((w > 0) & (w <= 1)).all() and (w.sum(-1) <= 1 + 1e-12).all()
  # k = 1 (threshold +inf when x is kept) and a huge inv_tau (one-hot fallback)
  ids, w, z = R.curriculum_topk(x0, torch.tensor([-1.0, 1.0]), 1.0, 1, K, generator=gen(17))
  assert torch.isfinite(w).all() and ids.shape == (2, 7, 1)
  ids, w, z = R.curriculum_topk(x0, torch.tensor([-1.0, 1.0]), 1e6, 4, K, generator=gen(18))
  assert torch.allclose(w.sum(-1), torch.ones(2, 7, dtype=F64))
  with pytest.raises(ValueError):
    R.curriculum_topk(x0, torch.tensor([0.0, 0.0]), 1.0, K, K)


# --------------------------------------------------------------------------
# Section 3: losses
# --------------------------------------------------------------------------

def _trans(a, K):
  """Q[i, j] = q(z = j | x = i) at level a: a I + (1 - a)/K."""
  return a * torch.eye(K, dtype=F64) + (1 - a) / K


def _brute_posterior(p, z, at, as_, K):
  """q(z_s = j | z_t = z) = sum_x p_x q(j | x; as) q(z | j; at/as) / sum_x p_x q(z | x; at)."""
  num = (p[:, None] * _trans(as_, K)).sum(0) * _trans(at / as_, K)[:, z]
  return num / (p * _trans(at, K)[:, z]).sum()


def _loss_inputs(seed, B=3, L=5, K=6):
  g = gen(seed)
  logits = 2 * torch.randn(B, L, K, generator=g, dtype=F64)
  x0 = torch.randint(0, K, (B, L), generator=g)
  z = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, K, (B, L), generator=g))
  alpha = 0.05 + 0.9 * torch.rand(B, 1, generator=g, dtype=F64)
  dalpha = -0.1 - torch.rand(B, 1, generator=g, dtype=F64)
  return logits, z, x0, alpha, dalpha


def test_usdm_loss_is_kl_rate():
  """loss = lim_{dt -> 0} KL(q(z_s | z_t, x) || p_theta(z_s | z_t)) / dt with
  alpha_s = alpha_t - dalpha dt, the discrete posterior built by matrices."""
  logits, z, x0, alpha, dalpha = _loss_inputs(20)
  B, L, K = logits.shape
  loss = R.usdm_loss(logits, z, x0, alpha, dalpha)
  assert loss.shape == (B, L) and loss.dtype == F64
  assert (x0 == z).any() and (x0 != z).any()
  for b in range(B):
    for l in range(L):
      def rate(dt):
        at = alpha[b, 0]
        as_ = at - dalpha[b, 0] * dt
        q = _brute_posterior(torch.nn.functional.one_hot(x0[b, l], K).double(), z[b, l], at, as_, K)
        p = _brute_posterior(torch.softmax(logits[b, l], -1), z[b, l], at, as_, K)
        return (q * (q / p).log()).sum() / dt
      limit = 2 * rate(1e-5) - rate(2e-5)
      assert loss[b, l].item() == pytest.approx(limit.item(), rel=1e-5)


def test_usdm_loss_properties():
  logits, z, x0, alpha, dalpha = _loss_inputs(21, B=4, L=50, K=9)
  K = logits.shape[-1]
  loss = R.usdm_loss(logits.float(), z, x0, alpha, dalpha)
  assert (loss >= 0).all()                    # a KL rate
  # alpha as [B], [B, 1], [B, L] agree
  for a_shape in (alpha[:, 0], alpha.expand(-1, z.shape[1])):
    d_shape = dalpha[:, 0] if a_shape.ndim == 1 else dalpha.expand(-1, z.shape[1])
    assert torch.allclose(R.usdm_loss(logits.float(), z, x0, a_shape, d_shape), loss)
  # perfect model: 0 (exactly for a one-hot, ~0 for sharp logits)
  lp = torch.log(torch.nn.functional.one_hot(x0, K).double())
  assert R.usdm_loss_from_log_probs(lp, z, x0, alpha, dalpha).abs().max() < 1e-12
  sharp = 40.0 * torch.nn.functional.one_hot(x0, K).double()
  assert R.usdm_loss(sharp, z, x0, alpha, dalpha).abs().max() < 1e-10
  # from log-probs == from logits
  assert torch.allclose(R.usdm_loss_from_log_probs(torch.log_softmax(logits, -1), z, x0, alpha, dalpha),
                        R.usdm_loss(logits, z, x0, alpha, dalpha), rtol=1e-12)


def test_usdm_loss_gradcheck():
  logits, z, x0, alpha, dalpha = _loss_inputs(22, B=2, L=3, K=5)
  logits.requires_grad_(True)
  assert torch.autograd.gradcheck(lambda lg: R.usdm_loss(lg, z, x0, alpha, dalpha), (logits,))


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_distill_kl(direction):
  g = gen(23)
  s = torch.randn(3, 4, 10, generator=g, requires_grad=True)
  t = torch.randn(3, 4, 10, generator=g, requires_grad=True)
  kl = R.distill_kl(s, t, direction)
  ls, lt = torch.log_softmax(s.double(), -1), torch.log_softmax(t.double(), -1)
  if direction == "fwd":
    ex = torch.nn.functional.kl_div(ls, lt, log_target=True, reduction="none").sum(-1)
  else:
    ex = torch.nn.functional.kl_div(lt, ls, log_target=True, reduction="none").sum(-1)
  assert torch.allclose(kl, ex, atol=1e-12) and (kl >= 0).all()
  kl.sum().backward()
  assert s.grad is not None and t.grad is None
  assert R.distill_kl(s, s, direction).abs().max() < 1e-12


# --------------------------------------------------------------------------
# Section 4: sampling
# --------------------------------------------------------------------------

def test_distill_kl_zero_log_zero():
  # -inf logits are probability 0 with 0 log 0 = 0 (closed forms on 4 entries).
  ninf = -math.inf
  s = torch.tensor([[0.0, ninf, 1.0, ninf]], dtype=F64)
  t = torch.tensor([[2.0, ninf, ninf, 0.0]], dtype=F64)
  # pS > 0 at 2 where pT = 0 (bwd), pT > 0 at 3 where pS = 0 (fwd): +inf.
  assert R.distill_kl(s, t, "bwd").item() == math.inf
  assert R.distill_kl(s, t, "fwd").item() == math.inf
  # Same support {0, 2}: only the 0 log 0 entries drop out.
  t2 = torch.tensor([[2.0, ninf, 0.5, ninf]], dtype=F64)
  ps = [1 / (1 + math.e), 0.0, math.e / (1 + math.e), 0.0]
  pt = [math.e**2 / (math.e**2 + math.e**0.5), 0.0, math.e**0.5 / (math.e**2 + math.e**0.5), 0.0]
  want_bwd = sum(ps[j] * math.log(ps[j] / pt[j]) for j in (0, 2))
  want_fwd = sum(pt[j] * math.log(pt[j] / ps[j]) for j in (0, 2))
  sg = s.clone().requires_grad_()
  kl = R.distill_kl(sg, t2, "bwd")
  kl.backward()
  assert kl.item() == pytest.approx(want_bwd, rel=1e-13)
  assert R.distill_kl(s, t2, "fwd").item() == pytest.approx(want_fwd, rel=1e-13)
  # dKL/dls_i = pS_i (log(pS_i / pT_i) - KL), 0 where pS_i = 0: finite
  want_g = [ps[j] * (math.log(ps[j] / pt[j]) - want_bwd) if ps[j] > 0 else 0.0 for j in range(4)]
  torch.testing.assert_close(sg.grad[0], torch.tensor(want_g, dtype=F64), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fn", ["usdm", "posterior"])
def test_minus_inf_logits_are_the_limit(fn):
  # -inf behaves as the limit of a very negative logit (exp(-300) ~ 1e-130 is negligible).
  K = 9
  s = torch.randn(3, K, generator=gen(0), dtype=F64)
  s[:, :4] = -math.inf
  lim = s.clone()
  lim[:, :4] = -300.0
  z, x0 = torch.tensor([0, 5, 2]), torch.tensor([1, 5, 7])  # p = 0 at z (row 0) and at x0 (row 0)
  a = torch.tensor([0.3, 0.6, 0.9], dtype=F64)
  if fn == "usdm":
    d = torch.full((3,), -1.0, dtype=F64)
    got, want = R.usdm_loss(s, z, x0, a, d), R.usdm_loss(lim, z, x0, a, d)
  else:
    got = R.posterior(s, z, a, a + 0.05, top_p=0.7)
    want = R.posterior(lim, z, a, a + 0.05, top_p=0.7)
  assert torch.isfinite(got).all()
  torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_posterior_vs_brute_force():
  B, L, K = 2, 4, 7
  g = gen(30)
  logits = 3 * torch.randn(B, L, K, generator=g)
  z = torch.randint(0, K, (B, L), generator=g)
  alpha_t = torch.tensor([0.2, 0.6], dtype=F64)
  alpha_s = torch.tensor([0.5, 0.9], dtype=F64)
  for at_shape, as_shape in [(alpha_t, alpha_s), (alpha_t[:, None], alpha_s[:, None]),
                             (alpha_t[:, None].expand(B, L), alpha_s[:, None].expand(B, L))]:
    q = R.posterior(logits, z, at_shape, as_shape)
    assert q.shape == (B, L, K) and q.dtype == F64
    assert (q >= 0).all() and torch.allclose(q.sum(-1), torch.ones(B, L, dtype=F64), atol=1e-14)
    p = torch.softmax(logits.double(), -1)
    for b in range(B):
      for l in range(L):
        bf = _brute_posterior(p[b, l], z[b, l], alpha_t[b], alpha_s[b], K)
        assert torch.allclose(q[b, l], bf, atol=1e-14)
  # alpha_s = 1: the x0 posterior p_x q(z | x) / sum
  q = R.posterior(logits, z, alpha_t, torch.ones(B, dtype=F64))
  lik = alpha_t[:, None, None] * torch.nn.functional.one_hot(z, K) + (1 - alpha_t[:, None, None]) / K
  ex = p * lik
  assert torch.allclose(q, ex / ex.sum(-1, keepdim=True), atol=1e-14)
  # temperature acts on the logits
  assert torch.allclose(R.posterior(logits, z, alpha_t, alpha_s, temperature=0.7),
                        R.posterior(logits / 0.7, z, alpha_t, alpha_s), atol=1e-14)


def test_posterior_psi_mix():
  B, L, K = 2, 3, 6
  logits = torch.randn(B, L, K, generator=gen(31))
  z = torch.randint(0, K, (B, L), generator=gen(32))
  at, as_ = torch.tensor([0.3, 0.5]), torch.tensor([0.6, 0.8])
  q1 = R.posterior(logits, z, at, as_)
  q0 = R.posterior(logits, z, at, torch.ones(2))
  pc = as_.double()[:, None, None] * q0 + (1 - as_.double()[:, None, None]) / K
  for kappa in (0.0, 0.25):
    q = R.posterior(logits, z, at, as_, kappa=kappa)
    assert torch.allclose(q, kappa * q1 + (1 - kappa) * pc, atol=1e-14)
    assert torch.allclose(q.sum(-1), torch.ones(B, L, dtype=F64), atol=1e-14)


def _nucleus_loop(p, top_p):
  """Plain-Python nucleus: sorted descending (stable), keep while the mass
  before the token is <= top_p."""
  order = sorted(range(len(p)), key=lambda j: -p[j])
  keep, before = set(), 0.0
  for j in order:
    if before > top_p and keep:
      break
    keep.add(j)
    before += p[j]
  out = [p[j] if j in keep else 0.0 for j in range(len(p))]
  return [v / sum(out) for v in out]


def test_nucleus_filter():
  lp = torch.log(torch.tensor([[0.2, 0.5, 0.3]], dtype=F64))
  keep = lambda tp: (R.nucleus_filter(lp, tp).exp() > 0)[0].tolist()
  assert keep(0.5) == [False, True, True]      # mass before rank 1 is 0.5 <= 0.5
  assert keep(0.49) == [False, True, False]
  assert keep(0.81) == [True, True, True]
  assert torch.equal(R.nucleus_filter(lp, 1.0), lp) and torch.equal(R.nucleus_filter(lp, 0.0), lp)
  lp = torch.log_softmax(2 * torch.randn(20, 30, generator=gen(33), dtype=F64), -1)
  for tp in (0.1, 0.5, 0.9, 0.99):
    out = R.nucleus_filter(lp, tp).exp()
    for r in range(20):
      assert torch.allclose(out[r], torch.tensor(_nucleus_loop(lp[r].exp().tolist(), tp), dtype=F64),
                            atol=1e-14)
  # posterior with top_p: p replaced by the filtered, renormalised p
  logits = torch.randn(1, 5, 30, generator=gen(34))
  z = torch.randint(0, 30, (1, 5), generator=gen(35))
  q = R.posterior(logits, z, 0.4, 0.7, top_p=0.8)
  q_ref = R.posterior(R.nucleus_filter(torch.log_softmax(logits.double(), -1), 0.8), z, 0.4, 0.7)
  assert torch.allclose(q, q_ref, atol=1e-14)


def test_sample_categorical_and_step():
  probs = torch.tensor([0.5, 0.25, 0.125, 0.1, 0.025, 0.0], dtype=F64)
  draws = R.sample_categorical(probs.expand(60000, 6), generator=gen(36))
  assert chi2_pvalue(torch.bincount(draws, minlength=6).numpy(), probs.numpy()) > P_MIN
  K, N = 5, 40000
  logits = torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5]).expand(2, N, K)
  z = torch.full((2, N), 1)
  at, as_ = torch.tensor([0.3, 0.6]), torch.tensor([0.5, 1.0])
  zs = R.sample_step(logits, z, at, as_, generator=gen(37))
  q = R.posterior(logits[:, :1], z[:, :1], at, as_)
  for b in range(2):
    assert chi2_pvalue(torch.bincount(zs[b], minlength=K).numpy(), q[b, 0].numpy()) > P_MIN


@pytest.mark.parametrize("schedule,sampler,kappa", [
  ("loglinear", "ancestral", 1.0), ("cosine", "ancestral", 1.0),
  ("loglinear", "psi", 0.3)])
def test_generate_recovers_data_law(schedule, sampler, kappa):
  """Tokens iid ~ pi: the NELBO-optimal mean parameterization is x_theta = pi
  (then posterior() is the exact reverse transition, for any kappa), so the
  samples follow pi up to the prior mismatch |alpha(1)| <= 1e-3 (loglinear)."""
  K, B, L, steps = 5, 100, 200, 4
  pi = torch.tensor([0.45, 0.25, 0.15, 0.1, 0.05], dtype=F64)
  seen = []

  def denoiser(z, t):
    seen.append(t.clone())
    assert z.shape == (B, L) and t.shape == (B,)
    return pi.log().expand(B, L, K)

  x = R.generate(denoiser, B, L, K, steps=steps, schedule=schedule, sampler=sampler,
                 kappa=kappa, generator=gen(40))
  assert x.shape == (B, L) and x.dtype == torch.int64
  ts = torch.linspace(1, R.SAMPLING_EPS, steps + 1, dtype=F64)
  assert [s[0].item() for s in seen] == ts[:-1].tolist() + [ts[-1].item()]
  counts = torch.bincount(x.reshape(-1), minlength=K).numpy()
  alpha1 = R.schedule_alpha(torch.tensor(1.0), schedule, vocab_size=K).item()
  # prior mismatch: z_1 uniform instead of alpha(1) pi + (1 - alpha(1))/K
  assert alpha1 < 0.05
  p_hat = counts / counts.sum()
  se = np.sqrt(pi.numpy() * (1 - pi.numpy()) / counts.sum())
  assert (np.abs(p_hat - pi.numpy()) < Z_MAX * se + alpha1).all()


def test_generate_noise_removal_modes():
  K, B, L = 4, 3, 8
  calls = []

  def denoiser(z, t):
    calls.append(t[0].item())
    return torch.tensor([0.0, 3.0, 1.0, 0.5]).expand(B, L, K)

  x = R.generate(denoiser, B, L, K, steps=3, noise_removal="greedy", generator=gen(41))
  assert (x == 1).all() and len(calls) == 4
  calls.clear()
  R.generate(denoiser, B, L, K, steps=3, noise_removal="none", generator=gen(42))
  assert len(calls) == 3 and calls[-1] == pytest.approx(1 / 3 + 2 / 3 * R.SAMPLING_EPS)
  calls.clear()
  R.generate(denoiser, B, L, K, steps=2, time_input="sigma", generator=gen(43))
  assert calls[0] == pytest.approx(-math.log(1e-3))   # sigma = -log alpha(1)


def test_usdm_loss_oracle_against_80_digits():
  """The oracle's cancellation-free form against an 80-digit evaluation of the Duo
  formula on rows where float64 formulas cancel (tiny vocabularies, alpha near 0
  and 1, near-perfect models): within 1e-10 relative, while the Duo formula in
  float64 (usdm_loss_from_log_probs) has no correct digit on some of them."""
  import mp_oracle
  worst, worst_duo = 0.0, 0.0
  for logits, z, x, alpha, dalpha in mp_oracle.hard_rows():
    exact = float(mp_oracle.usdm_loss(logits.double().tolist(), z, x, alpha, dalpha))
    args = (torch.tensor([z]), torch.tensor([x]), torch.tensor([alpha], dtype=torch.float64),
            torch.tensor([dalpha], dtype=torch.float64))
    got = R.usdm_loss(logits[None].double(), *args).item()
    duo = R.usdm_loss_from_log_probs(torch.log_softmax(logits.double(), -1)[None], *args).item()
    worst = max(worst, abs(got - exact) / abs(exact))
    worst_duo = max(worst_duo, abs(duo - exact) / abs(exact))
  assert worst < 1e-10
  assert worst_duo > 1.0
