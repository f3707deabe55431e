"""High-precision evaluations (mpmath, 80 digits) that check the float64 oracle
(duo_fast.reference) where float64 formulas cancel."""

from __future__ import annotations

import mpmath
import torch

DIGITS = 80


def usdm_loss(logits, z: int, x: int, alpha: float, dalpha: float):
    """The uniform-state NELBO of one token from the Duo code's formula, term by term
    (docs/math.md §3): with xb = K alpha p + 1 - alpha (the model's marginal) and xbar
    = K alpha onehot(x) + 1 - alpha (the true one),
      loss = dalpha / (K alpha) (K (1/xbar_z - 1/xb_z)
             - sum_{j != z} (xbar_j / xbar_z) log(xb_z xbar_j / (xb_j xbar_z))),
    evaluated at 80 digits, so its cancellations cost nothing. ``logits``: a
    sequence of floats (taken exactly) or mpf; returns an mpf."""
    with mpmath.workdps(DIGITS):
        lg = [v if isinstance(v, mpmath.mpf) else mpmath.mpf(float(v)) for v in logits]
        K = len(lg)
        m = max(lg)
        ex = [mpmath.exp(v - m) for v in lg]
        s = mpmath.fsum(ex)
        p = [e / s for e in ex]
        a, da = mpmath.mpf(alpha), mpmath.mpf(dalpha)
        xb = [K * a * pj + 1 - a for pj in p]
        xbar = [K * a * (1 if j == x else 0) + 1 - a for j in range(K)]
        term1 = K * (1 / xbar[z] - 1 / xb[z])
        term2 = mpmath.fsum(xbar[j] / xbar[z] * mpmath.log(xb[z] * xbar[j] / (xb[j] * xbar[z]))
                            for j in range(K) if j != z)
        return da / (K * a) * (term1 - term2)


def hard_rows(seed: int = 0, vocab_sizes=(2, 3, 5, 16, 50), alphas=(1e-6, 1e-3, 0.5, 1 - 1e-4, 1 - 1e-6),
              margins=(0.0, 5.0, 15.0, 30.0)):
    """Rows where float64 formulas cancel: tiny vocabularies, alpha near 0 and 1,
    near-perfect models (the clean id's logit raised by a margin), z == x and z != x.
    Yields (logits float32 [K], z, x, alpha, dalpha)."""
    g = torch.Generator().manual_seed(seed)
    for K in vocab_sizes:
        for alpha in alphas:
            for margin in margins:
                for same in (True, False):
                    logits = torch.randn(K, generator=g)
                    logits[0] += margin
                    yield logits, 0 if same else 1, 0, alpha, -1.0
