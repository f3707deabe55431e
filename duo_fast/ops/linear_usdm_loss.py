"""linear_usdm_loss: the output layer fused with usdm_loss, chunk by chunk, so that
the [N, K] logits never exist (docs/math.md §3)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import per_token_level, token_ids
from ._common import _check_ids_like
from ._linear_chunks import check_chunk_size, check_linear, check_reduction, linear_rows


def _usdm_rows(logits, s, e, compute_grad, z, x0, alpha, dalpha):
    """The row op of linear_usdm_loss (ops/_linear_chunks.py): tokens [s, e)."""
    return torch.ops.duo_fast.usdm_loss.default(logits, z[s:e], x0[s:e], alpha[s:e], dalpha[s:e], compute_grad)


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
    ``[B, L, d]``; ``weight``: ``[K, d]``; ``bias``: ``[K]`` or None (float32,
    or any float dtype: the chunk's logits are formed in it and the loss math
    runs in float32/float64). Differentiable w.r.t. hidden, weight and bias.
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
                       a.reshape(-1), d.reshape(-1)), chunk_size=chunk_size, reduction=reduction)
