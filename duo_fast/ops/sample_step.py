"""sample_step and posterior: one exact reverse step of a uniform-state model
(docs/math.md §4)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import check_real, check_temperature, check_tensor, check_vocab, per_token_level, token_ids
from .._random import philox_seed
from ._common import _LOGIT_DTYPES, _check_ids_like, check_no_func_transform, register_no_autograd


def _step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p):
    check_tensor(logits, "logits", _LOGIT_DTYPES)
    z = token_ids(z, "z")
    if logits.dim() < 1:
        raise ValueError("duo_fast: logits must be [..., K], got a 0-dim tensor")
    check_vocab(logits.shape[-1], "logits.size(-1) (the vocabulary size)")
    _check_ids_like(logits, "logits", z)
    return (z, *_step_levels(z, alpha_t, alpha_s, kappa, temperature, top_p))


def _step_levels(z, alpha_t, alpha_s, kappa, temperature, top_p):
    """The levels (float64 of z's shape) and scalars of a reverse step, checked."""
    a_t = per_token_level(alpha_t, "alpha_t", z, "z")
    a_s = per_token_level(alpha_s, "alpha_s", z, "z")
    kappa = check_real(kappa, "kappa", 0.0, 1.0)
    temperature = check_temperature(temperature)
    top_p = check_real(top_p, "top_p", 0.0, 1.0, lo_open=True)
    return a_t, a_s, kappa, temperature, top_p


def sample_step(
    logits: torch.Tensor,
    z: torch.Tensor,
    alpha_t,
    alpha_s,
    *,
    kappa: float = 1.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """One reverse step of a uniform-state model: ``z_s ~ q(z_s | z_t, p)`` with
    ``p = softmax(logits / temperature)`` (docs/math.md §4, ``_ancestral_update`` /
    ``_psi_update`` + ``sample_categorical`` of the reference), without any
    ``[N, K]`` temporary.

    ``logits``: ``[B, L, K]`` (any leading shape) float32, bfloat16 or float16,
    read in float32; ``z``: int64 ids of the leading shape; ``alpha_t``,
    ``alpha_s``: levels per row or per token with ``0 <= alpha_t <= alpha_s <= 1``
    and ``alpha_t < 1`` (``alpha_s = 1`` is the noise-removal step). ``kappa``
    in [0, 1]: ``kappa < 1`` is the Psi-sampler mix ``kappa q_post + (1 - kappa)
    (alpha_s q_post(alpha_s=1) + (1 - alpha_s)/K)``. ``top_p`` in (0, 1]: nucleus
    filtering of ``p`` as ``utils.top_k_top_p_filtering`` (ties ranked by lower
    id; the boundary found by a radix select, not a sort).

    The draw is exact: the posterior is a mixture of ``p``, the uniform law and
    a point mass at ``z`` with weights that need only ``p_z``; one 53-bit
    uniform picks the part and another draws from ``p`` by inverse CDF against
    float64 running sums (no truncated tail). Per row: the max, the sum of
    ``exp((x - max)/T)``, then for the model part a scan of about half the row.
    Randomness per ``duo_fast._random``: with ``seed`` the tokens are identical
    on CPU (any thread count) and CUDA except where rounding of the sums moves
    the uniform across a token boundary (probability ~1e-15 per token).
    A ``-inf`` logit is probability 0 (masked vocabularies): never drawn from
    ``p`` (only the uniform part or the point mass at ``z`` can give it).
    ``z`` may be int64 or int32 (``z_s`` comes back in its dtype).

    Bad values (docs/bad_values.md): a logits row with a NaN or +inf entry, or
    with no finite entry (only -inf), is no distribution: the op raises,
    naming ``logits`` (CPU: at the call, no tokens returned; CUDA: that row
    keeps ``z`` and the next duo_fast CUDA call, or
    :func:`check_device_errors`, raises). Levels out of range or NaN raise.
    """
    ids, a_t, a_s, kappa, temperature, top_p = _step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p)
    key = philox_seed(logits.device, generator, seed)
    out = torch.ops.duo_fast.sample_step.default(logits, ids, a_t, a_s, kappa, temperature, top_p, key, 0)
    return out.to(z.dtype)


@torch.library.register_fake("duo_fast::sample_step")
def _sample_step_fake(logits, z, alpha_t, alpha_s, kappa, temperature, top_p, seed, offset, row_offset=0):
    return z.new_empty(z.shape)


def posterior(
    logits: torch.Tensor,
    z: torch.Tensor,
    alpha_t,
    alpha_s,
    *,
    kappa: float = 1.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """The dense law ``q(z_s)`` ``[..., K]`` (float32) that :func:`sample_step`
    draws from, for analysis and tests (docs/math.md §4, ``_posterior_from_x0`` with
    ``x0 = p``, and the Psi mix for ``kappa < 1``). Same arguments as
    :func:`sample_step`. A ``-inf`` logit is probability 0 in ``p`` (its
    ``q`` is the uniform and point-mass parts alone). Bad values as
    :func:`sample_step`: a logits row with NaN, +inf or no finite entry raises
    (on CUDA: a NaN row of ``q``, and the next duo_fast CUDA call raises).
    Not differentiable: a backward that needs a gradient w.r.t. ``logits``,
    ``alpha_t`` or ``alpha_s`` raises naming it."""
    check_no_func_transform("posterior", logits, alpha_t, alpha_s)
    ids, a_t, a_s, kappa, temperature, top_p = _step_args(logits, z, alpha_t, alpha_s, kappa, temperature, top_p)
    return torch.ops.duo_fast.posterior.default(logits, ids, a_t, a_s, kappa, temperature, top_p)


@torch.library.register_fake("duo_fast::posterior")
def _posterior_fake(logits, z, alpha_t, alpha_s, kappa, temperature, top_p):
    return logits.new_empty(logits.shape, dtype=torch.float32)


register_no_autograd("duo_fast::posterior", "posterior", {0: "logits", 2: "alpha_t", 3: "alpha_s"})
