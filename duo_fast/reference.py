"""Pure-PyTorch float64 oracle for every section of SPEC.md.

Slow and memory-hungry on purpose: each function is written the obvious way,
straight from the equations, so that the fused kernels can be tested against
it. Everything is computed in float64 (float32 inputs are upcast) and returned
in float64 unless stated. Random draws come from a `torch.Generator` (None:
the global generator of the tensor's device).

Reference code: github.com/s-sahoo/duo (`algo.py`, `trainer_base.py`,
`utils.py`). Only torch and math are imported at module level; scipy is
imported lazily by the quadrature routines.
"""

import functools
import math
from dataclasses import dataclass

import torch

_F64 = torch.float64
_LOG_2PI = math.log(2.0 * math.pi)

# Defaults of the reference configuration.
DUO_GAMMA_MIN = -3.5    # configs/algo/duo.yaml curriculum.gamma_min (LM1B)
DUO_GAMMA_MAX = -1.75   # configs/algo/duo.yaml curriculum.gamma_max
SCHEDULE_EPS = 1e-3     # configs/noise/{log-linear,cosine}.yaml: eps
SAMPLING_EPS = 1e-5     # trainer_base generate_samples(eps=1e-5): last t
TRAIN_T_EPS = 1e-3      # configs/config.yaml training.sampling_eps: t ~ U[eps, 1]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

def _f64(v, device=None):
  """float64 tensor; Python numbers are converted without a float32 detour."""
  if isinstance(v, torch.Tensor):
    return v.to(device=device or v.device, dtype=_F64)
  return torch.tensor(v, dtype=_F64, device=device)


def _per_token(v, like):
  """Broadcast a level given as scalar, [B], [B, 1] or [B, L] to like's [B, L].

  A 1-D tensor is per batch row (SPEC 0), not per position.
  """
  v = _f64(v, like.device)
  if v.ndim == 1 and like.ndim >= 2:
    v = v.reshape(v.shape[0], *([1] * (like.ndim - 1)))
  return v.expand(like.shape)


def _uniform_open(shape, generator, device):
  """Uniform on (0, 1) from 53 random bits: (n + 1/2) / 2^53."""
  n = torch.randint(0, 2 ** 53, shape, generator=generator, device=device)
  return (n.to(_F64) + 0.5) * 2.0 ** -53


def _scales(gamma):
  """Gaussian signal / noise scales a~ = sqrt(sigmoid(-gamma)), s~ = sqrt(sigmoid(gamma))."""
  return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def _ndtri_upper(log_v):
  """Phi^-1(V) from log V, accurate for V near 1: -Phi^-1(1 - V)."""
  return -torch.special.ndtri(-torch.expm1(log_v))


# --------------------------------------------------------------------------
# Section 1: the diffusion transformation operator
# --------------------------------------------------------------------------

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

  With t = u - nu (SPEC 1):
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
  """pt = P(argmax(a~ e_x + s~ eps) = x) and d pt / d gamma (SPEC 1)."""
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


# --------------------------------------------------------------------------
# Section 2: uniform-state latents from the Gaussian latent
# --------------------------------------------------------------------------

def sample_zt_dense(x0, gamma, vocab_size, gamma_s=None, generator=None):
  """Dense reference (SPEC 2, 2b): z = argmax_j (a~ onehot(x) + s~ eps)_j with
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
  """Exact law of the coupled pair of SPEC 2b.

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
  """O(1) sampler of SPEC 2a/2b from (eps_x, M, j*) per token:
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


def curriculum_embed_dense(x0, gamma, inv_tau, embedding, *, noise=None,
                           generator=None):
  """SPEC 2d: w = a~ onehot(x) + s~ noise, P = softmax(w * inv_tau),
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


@dataclass
class TopKDraws:
  """The random inputs of the top-k curriculum (SPEC 2e), per token.

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
  """Duo++ efficient curriculum, SPEC 2e step by step.

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
  """SPEC 2e step 6: h = sum_i w_i E[id_i] (float64, differentiable w.r.t.
  embedding). Returns (h [B, L, d], z_t)."""
  ids, weights, z_t = curriculum_topk(
    x0, gamma, inv_tau, k, embedding.shape[0], zt_rule=zt_rule,
    generator=generator, draws=draws)
  h = (weights[..., None] * embedding.to(_F64)[ids]).sum(-2)
  return h, z_t


# --------------------------------------------------------------------------
# Section 3: losses
# --------------------------------------------------------------------------

def usdm_loss_from_log_probs(log_probs, z, x0, alpha, dalpha):
  """Per-token continuous-time NELBO [B, L] (SPEC 3, DUO_BASE.nll_per_token).

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
  """SPEC 3 from raw logits: log_x_theta = log_softmax(logits) in float64."""
  return usdm_loss_from_log_probs(torch.log_softmax(logits.to(_F64), -1),
                                  z, x0, alpha, dalpha)


def _kl_terms(lw, lo):
  """w (log w - log o) per entry with 0 log 0 = 0 (a -inf logit is probability
  0): 0 where log w = -inf, +inf where only log o = -inf. The masked log-ratio
  keeps autograd finite there (no 0 * inf in the backward of the product)."""
  zero_w = lw == -math.inf
  d = torch.where(zero_w, torch.zeros_like(lw), lw - lo)
  return lw.exp() * d


def distill_kl(student_logits, teacher_logits, direction="bwd"):
  """Per-token KL [B, L]: bwd = KL(pS || pT), fwd = KL(pT || pS).

  Gradient flows to the student only (the teacher is detached). A -inf logit
  is probability 0 with 0 log 0 = 0; a zero of the other law where the
  weighting one is positive gives +inf.
  """
  ls = torch.log_softmax(student_logits.to(_F64), -1)
  lt = torch.log_softmax(teacher_logits.detach().to(_F64), -1)
  if direction == "bwd":
    return _kl_terms(ls, lt).sum(-1)
  if direction == "fwd":
    return _kl_terms(lt, ls).sum(-1)
  raise ValueError(direction)


# --------------------------------------------------------------------------
# Section 4: sampling
# --------------------------------------------------------------------------

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
  """trainer DUO_BASE._posterior_from_x0 with x0 = p (SPEC 4)."""
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
  """Dense q(z_s) [B, L, K] float64 (SPEC 4).

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


def guided_posterior(cond_logits, uncond_logits, z, alpha_t, alpha_s,
                     guid_weight, *, kappa=1.0, temperature=1.0, top_p=1.0):
  """Classifier-free guided q(z_s) [B, L, K] float64 (SPEC 4;
  trainer_base._get_guided_posterior_from_xt, and _psi_update around it).

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


def schedule_alpha(t, schedule="loglinear", *, vocab_size=None,
                   eps=SCHEDULE_EPS, gamma_min=DUO_GAMMA_MIN,
                   gamma_max=DUO_GAMMA_MAX):
  """alpha(t) of a sampling schedule: "loglinear", "cosine" or "duo"."""
  if schedule == "loglinear":
    return loglinear_alpha(t, eps)[0]
  if schedule == "cosine":
    return cosine_alpha(t, eps)[0]
  if schedule == "duo":
    return gamma_schedule(t, vocab_size, gamma_min, gamma_max)[0]
  raise ValueError(schedule)


def psi_kappas(mode, alphas):
  """trainer_base._mode_to_psi_kappas for one segment covering the whole grid:
  kappa for each step i (levels alphas[i] -> alphas[i + 1]), float64 of length
  len(alphas) - 1 (the reference appends a trailing 1 for the grid's last
  point, which no step uses). Written per step with Python floats."""
  a = [float(v) for v in _f64(alphas).flatten()]
  n = len(a) - 1
  if not isinstance(mode, str):
    k = _f64(mode).flatten()
    return (k.expand(n) if k.numel() == 1 else k).clone()
  if mode == "pure-posterior":
    return torch.ones(n, dtype=_F64)
  if mode == "pure-pc":
    return torch.zeros(n, dtype=_F64)
  eta = float(mode.split("-")[-1])
  if mode.startswith("constant-") and not mode.startswith("constant-remdm"):
    return torch.full((n,), eta, dtype=_F64)
  out = []
  for i in range(n):
    at, as_ = a[i], a[i + 1]
    cap = min(eta, (1 - as_) / at) if at != 0 else eta
    if mode.startswith("max-capped-"):
      sigma = eta if at == 0 else cap
    elif mode.startswith("max-rescale-"):
      sigma = (cap if at > 0 else 1.0) * eta
    elif mode.startswith("constant-remdm"):
      sigma = eta
    else:
      raise ValueError(mode)
    out.append(min(max(1 - sigma / (1 - as_), 0.0), 1.0))
  return torch.tensor(out, dtype=_F64)


@torch.no_grad()
def generate(denoiser, batch_size, length, vocab_size, *, steps,
             schedule="loglinear", sampler="ancestral",
             noise_removal="ancestral", kappa=1.0, top_p=1.0,
             temperature=1.0, eps=SAMPLING_EPS, schedule_eps=SCHEDULE_EPS,
             time_input="t", device="cpu", generator=None):
  """Reverse process of trainer_base.Diffusion.generate_samples for
  uniform-state models.

  Time grid: ts = linspace(1, eps, steps + 1) (float64; the reference uses
  float32). z starts uniform on [0, K). Step i = 0..steps-1 calls
  denoiser(z, t) at t = ts[i] and samples z ~ q(z_s) with
  alpha_t = alpha(ts[i]), alpha_s = alpha(ts[i+1]). Then, at t = ts[-1] = eps:
    noise_removal="ancestral": one more denoiser call and a step to alpha_s = 1;
    "greedy": z = argmax of that call's logits; "none": no call.
  So the denoiser sees steps (+1 unless "none") time values.
  denoiser(z [B, L] int64, t [B] float64) -> logits [B, L, K];
  time_input="sigma" passes -log(alpha(t)) instead (what the reference's
  backbone receives). alpha(t) is the schedule ("loglinear", "cosine",
  "duo") with its own eps = schedule_eps (configs/noise: 1e-3).
  sampler="ancestral" (kappa ignored) or "psi": kappa is a float, a
  length-`steps` sequence or a mode string of psi_kappas; the final
  noise-removal step is ancestral.
  """
  K = int(vocab_size)
  if sampler not in ("ancestral", "psi"):
    raise ValueError(sampler)
  if noise_removal not in ("ancestral", "greedy", "none"):
    raise ValueError(noise_removal)
  ts = torch.linspace(1.0, eps, steps + 1, dtype=_F64)
  kappas = torch.ones(steps, dtype=_F64)
  if sampler == "psi":
    kappas = psi_kappas(kappa, torch.stack(
      [schedule_alpha(t.reshape(1), schedule, vocab_size=K, eps=schedule_eps)[0] for t in ts]))

  def alpha(t):
    return schedule_alpha(torch.full((batch_size,), float(t), dtype=_F64),
                          schedule, vocab_size=K, eps=schedule_eps)

  def call(z, t):
    tt = torch.full((batch_size,), float(t), dtype=_F64, device=device)
    if time_input == "sigma":
      tt = -torch.log(alpha(t)).to(device)
    elif time_input != "t":
      raise ValueError(time_input)
    return denoiser(z, tt)

  z = torch.randint(0, K, (batch_size, length), generator=generator,
                    device=device)
  for i in range(steps):
    logits = call(z, ts[i])
    z = sample_step(logits, z, alpha(ts[i]).to(device),
                    alpha(ts[i + 1]).to(device), kappa=float(kappas[i]),
                    temperature=temperature, top_p=top_p,
                    generator=generator)
  if noise_removal == "ancestral":
    logits = call(z, ts[-1])
    a0 = alpha(ts[-1]).to(device)
    z = sample_step(logits, z, a0, torch.ones_like(a0),
                    temperature=temperature, top_p=top_p,
                    generator=generator)
  elif noise_removal == "greedy":
    z = call(z, ts[-1]).argmax(-1)
  return z
