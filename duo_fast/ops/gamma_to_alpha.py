"""gamma_to_alpha: the diffusion transformation operator (docs/math.md §1)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import check_tensor, check_vocab
from ._common import _FLOAT_LEVELS


def gamma_to_alpha(gamma: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform-state signal level of a Gaussian log-noise level (docs/math.md §1).

    Returns ``(alpha, dalpha_dgamma)``, same shape and dtype (float32 or float64)
    as ``gamma``, for vocabulary size ``K = vocab_size`` (2 <= K <= 2^24):

        pt    = int phi(u - nu) Phi(u)^(K-1) du,  nu = exp(-gamma / 2)
        alpha = (K pt - 1) / (K - 1)

    Evaluated from a per-K table of Chebyshev expansions of log(alpha),
    log(1 - alpha) and log(-dalpha/dgamma) on [-9, 20] (built once per K and
    process by adaptive Gauss-Legendre quadrature, ~0.1 s; no data file), with
    the exact limits below -9 (alpha = 1, dalpha = 0: both differ from those by
    less than 1e-300) and a second-order expansion in nu above 20. In float64:
    |alpha - exact| < 1e-14, and alpha, 1 - alpha and dalpha are each within
    1e-7 relative of the exact values (dalpha values below ~1e-300 flush to 0).
    -inf gives (1, 0) and +inf gives (0, 0). A NaN gamma raises (a level is
    never NaN; on CUDA its outputs are NaN and the next duo_fast CUDA call
    raises, see docs/bad_values.md).

    Not differentiable (a schedule, not a model output): for d alpha / d t use
    ``dalpha_dgamma * dgamma_dt``.
    """
    check_tensor(gamma, "gamma", _FLOAT_LEVELS)
    check_vocab(vocab_size)
    return torch.ops.duo_fast.gamma_to_alpha.default(gamma, vocab_size)


@torch.library.register_fake("duo_fast::gamma_to_alpha")
def _gamma_to_alpha_fake(gamma, vocab_size):
    torch._check(gamma.dtype in _FLOAT_LEVELS, lambda: f"duo_fast: gamma has dtype {gamma.dtype}")
    return gamma.new_empty(gamma.shape), gamma.new_empty(gamma.shape)
