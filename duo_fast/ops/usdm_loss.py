"""usdm_loss: the per-token uniform-state diffusion NELBO, fused with its gradient
(docs/math.md §3)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import check_tensor, check_vocab, per_token_level, token_ids
from ._common import _LOGIT_DTYPES, _check_ids_like, check_no_func_transform
from ._inplace_grad import (_FusedGradInplace, _fused_grad_backward, _fused_grad_fake, _fused_grad_setup_context,
                           _fused_value_fake)


def usdm_loss(
    logits: torch.Tensor,
    z: torch.Tensor,
    x0: torch.Tensor,
    alpha: torch.Tensor,
    dalpha: torch.Tensor,
    *,
    inplace_grad: bool = False,
) -> torch.Tensor:
    """Per-token uniform-state diffusion NELBO (docs/math.md §3; ``DUO_BASE.nll_per_token``
    on ``log_softmax(logits)``) from raw logits, fused: no ``[N, K]`` temporary.

    ``logits``: ``[B, L, K]`` float32, bfloat16 or float16, read natively (math
    in float32; no upcast copy) with the gradient written in the logits' dtype
    (each entry computed in float32 and rounded once); ``z``, ``x0``: ``[B, L]`` int64 (or int32) ids in
    ``[0, K)``; ``alpha`` in (0, 1) and ``dalpha`` <= 0 (d alpha / d t) per row
    (``[B]``, ``[B, 1]``) or per token (``[B, L]``). Returns ``[B, L]`` float32.
    Differentiable w.r.t. ``logits`` (first order; differentiating the gradient
    again raises, as does a backward that needs a gradient w.r.t. ``alpha`` or
    ``dalpha``; torch.func transforms other than vmap are refused, see
    :func:`duo_fast.ops._common.check_no_func_transform`): when they require grad the gradient is
    computed in the same call (three sweeps over each row: log-sum-exp,
    reductions, gradient) and scaled by ``grad_output`` in backward, so the only
    ``[N, K]`` memory is the gradient itself. The loss is evaluated in a form
    where every term vanishes for a perfect model (see csrc/include/duo_fast/
    usdm_loss.h): within 1e-5 relative, or 1e-8 of the size of its first-order
    parts for the tiniest losses (docs/math.md §3).

    Masked vocabularies: a ``-inf`` logit is probability 0 (``0 log 0 = 0``):
    it stays in the vocabulary size ``K`` of the uniform prior, its model
    marginal is ``1 - alpha``, its gradient is 0, and ``z`` or ``x0`` may be
    such an id (the loss stays finite).

    Bad values (docs/bad_values.md): ``alpha`` / ``dalpha`` out of range or NaN
    raise. Logits propagate: a row with a NaN or +inf logit, or entirely
    ``-inf``, gives a NaN loss and a NaN gradient row (as
    ``log_softmax``-based losses do), no error (AMP's GradScaler skips such
    steps).

    Memory: by default backward returns ``gradient * grad_output`` out of place,
    so its peak holds two ``[N, K]`` tensors (the op stays a plain custom op:
    opcheck, gradcheck, retain_graph, torch.compile). ``inplace_grad=True``
    hands the forward's gradient buffer to autograd, scaled in place: peak extra
    memory is the gradient alone (1x the logits' bytes, for every dtype), but backward can run
    only once. Inside ``torch.compile`` ``inplace_grad`` is ignored (the compiled
    graph plans its buffers itself; the values are the same).
    """
    check_tensor(logits, "logits", _LOGIT_DTYPES)
    check_no_func_transform("usdm_loss", logits, alpha, dalpha)
    z, x0 = token_ids(z, "z"), token_ids(x0, "x0")
    if logits.dim() < 2:
        raise ValueError(f"duo_fast: logits must be [..., K], got shape {tuple(logits.shape)}")
    check_vocab(logits.shape[-1], "logits.size(-1) (the vocabulary size)")
    _check_ids_like(logits, "logits", z, x0)
    a = per_token_level(alpha, "alpha", z, "z")
    d = per_token_level(dalpha, "dalpha", z, "z")
    compute_grad = torch.is_grad_enabled() and logits.requires_grad
    # Inside torch.compile the graph is traced functionally and plans its own buffers:
    # a buffer handed over between forward and backward cannot be traced, so there the
    # op is the plain custom op (same values).
    if inplace_grad and compute_grad and not torch.compiler.is_compiling():
        return _FusedGradInplace.apply("usdm_loss", "logits", _LEVELS, torch.ops.duo_fast.usdm_loss.default,
                                       logits, z, x0, a, d)
    loss, _ = torch.ops.duo_fast.usdm_loss.default(logits, z, x0, a, d, compute_grad)
    return loss


@torch.library.register_fake("duo_fast::usdm_loss")
def _usdm_loss_fake(logits, z, x0, alpha, dalpha, compute_grad):
    return _fused_grad_fake(logits, compute_grad)


@torch.library.register_fake("duo_fast::usdm_loss.into")
def _usdm_loss_into_fake(logits, z, x0, alpha, dalpha, grad):
    return _fused_value_fake(logits)


_LEVELS = {2: "alpha", 3: "dalpha"}  # index among the inputs after logits -> name (not differentiated)


def _usdm_loss_backward(ctx, grad_loss, grad_grad):
    return _fused_grad_backward(ctx, grad_loss, "usdm_loss", "logits", {i + 1: n for i, n in _LEVELS.items()}, 6)


torch.library.register_autograd("duo_fast::usdm_loss", _usdm_loss_backward, setup_context=_fused_grad_setup_context)
