"""linear_usdm_loss: the output layer fused with usdm_loss, chunk by chunk, so that
the [N, K] logits never exist (docs/math.md §3)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import per_token_level, token_ids
from ._common import _check_ids_like
from ._linear_chunks import check_chunk_size, check_linear, check_reduction, kernel_logits, linear_rows


def _usdm_rows(logits, s, e, compute_grad, bufs, z, x0, alpha, dalpha):
    """The row op of linear_usdm_loss (ops/_linear_chunks.py): tokens [s, e); the
    gradient into the pass's reused "grad" block where the pass reuses blocks."""
    return bufs.value_grad(torch.ops.duo_fast.usdm_loss, kernel_logits(logits), z[s:e], x0[s:e], alpha[s:e],
                           dalpha[s:e], compute_grad=compute_grad)


def linear_usdm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    x0: torch.Tensor,
    alpha: torch.Tensor,
    dalpha: torch.Tensor,
    *,
    chunk_size: int | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    """``usdm_loss(hidden @ weight.T + bias, z, x0, alpha, dalpha)`` without ever
    holding the full ``[B, L, K]`` logits: tokens are processed in chunks of
    ``chunk_size`` (default: ~64 MiB of float32 logits per chunk). ``hidden``:
    ``[B, L, d]``; ``weight``: ``[K, d]``; ``bias``: ``[K]`` or None, one dtype
    for the three: float32, bfloat16, float16 or float64 (the chunk's logits are
    formed in it; float64 logits are rounded to float32 for the loss kernel; the
    gradients are accumulated in float32 and returned in that dtype). Every
    tensor on one device. Differentiable w.r.t. hidden, weight and bias (first
    order: differentiating those gradients again raises, and so does a backward
    that needs a gradient w.r.t. ``alpha`` or ``dalpha``).
    Peak extra memory is O(chunk_size * K), independent of N.

    ``reduction``: ``"none"`` (default) returns the per-token ``[B, L]`` losses
    and recomputes each chunk's logits in backward (any ``grad_output``);
    ``"sum"`` / ``"mean"`` return the scalar sum / mean over tokens and, when a
    gradient is needed, compute the gradients in the forward, chunk by chunk
    (one logits GEMM and one kernel call per chunk instead of two of each; the
    float32 gradients of hidden and weight are held until backward, which then
    only scales them; one backward only). A ``-inf`` bias
    entry masks that id for every token: probability 0, as in
    :func:`usdm_loss` (its rows of the weight and bias gradients are 0).
    Bad values as :func:`usdm_loss`: NaN / +inf in hidden, weight or bias give
    NaN losses and gradients (no error); levels are checked; ids int64 or
    int32."""
    K = check_linear(hidden, weight, bias)
    z, x0 = token_ids(z, "z"), token_ids(x0, "x0")
    _check_ids_like(hidden, "hidden", z, x0)
    chunk_size = check_chunk_size(chunk_size, K, weight.shape[1])
    reduction = check_reduction(reduction)
    a = per_token_level(alpha, "alpha", z, "z")
    d = per_token_level(dalpha, "dalpha", z, "z")
    return linear_rows("linear_usdm_loss", _usdm_rows, hidden, weight, bias, (z.reshape(-1), x0.reshape(-1),
                       a.reshape(-1), d.reshape(-1)), chunk_size=chunk_size, reduction=reduction,
                       names=("hidden", "weight", "bias", "z", "x0", "alpha", "dalpha"))
