"""linear_usdm_loss: the output layer fused with usdm_loss, chunk by chunk, so that
the [N, K] logits never exist (docs/math.md §3)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import check_tensor, check_vocab, per_token_level, token_ids
from ._common import _check_ids_like


def _default_chunk_size(vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk so that one chunk's float32 logits (and their gradient)
    take about 64 MiB: large enough for efficient GEMMs, O(1) in N."""
    return max(1, min(4096, (64 << 20) // (4 * vocab_size)))


def _chunk_loss_grad(h2, weight, bias, zf, xf, af, df, s, e):
    """(loss, G = d loss / d logits) of tokens [s, e) of the fused linear + loss. The
    chunk's logits are float32, so G stays float32 for the GEMMs that take it (a
    16-bit G would add its rounding to grad_hidden / grad_weight)."""
    logits = torch.nn.functional.linear(h2[s:e], weight, bias).float()
    return torch.ops.duo_fast.usdm_loss.default(logits, zf[s:e], xf[s:e], af[s:e], df[s:e], True)


def _add_chunk_grads(g, h2, w32, grad_h, grad_w, grad_b, s, e):
    """grad_hidden[s:e] = G @ weight (w32: weight in float32), grad_weight += G^T @
    hidden[s:e], grad_bias += the sum of G's rows; each where it is not None."""
    if grad_h is not None:
        grad_h[s:e] = g @ w32
    if grad_w is not None:
        grad_w.addmm_(g.t(), h2[s:e].float())
    if grad_b is not None:
        grad_b += g.sum(0)


class _LinearUsdmLoss(torch.autograd.Function):
    """loss = usdm_loss(hidden @ weight.T + bias, ...), chunk by chunk.

    Forward: per chunk, the chunk's logits (GEMM) and the fused row kernel's
    loss; nothing of size [N, K] is kept. Backward: per chunk, the logits are
    recomputed, the kernel gives d loss / d logits, rows are scaled by
    grad_output, and grad_hidden = G @ weight, grad_weight += G^T @ hidden,
    grad_bias += sum of G's rows. Peak extra memory O(chunk_size * K); the
    price is a second logits GEMM in backward (works for any grad_output)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, z, x0, alpha, dalpha, chunk_size):
        N = z.numel()
        h2 = hidden.reshape(N, hidden.shape[-1])
        zf, xf, af, df = z.reshape(N), x0.reshape(N), alpha.reshape(N), dalpha.reshape(N)
        loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
        for s in range(0, N, chunk_size):
            e = min(N, s + chunk_size)
            # 16-bit hidden/weight give 16-bit logits, read natively (the loss of their exact
            # float32 upcast, without the copy)
            logits = torch.nn.functional.linear(h2[s:e], weight, bias)
            loss[s:e], _ = torch.ops.duo_fast.usdm_loss.default(logits, zf[s:e], xf[s:e], af[s:e], df[s:e], False)
        ctx.save_for_backward(hidden, weight, bias, z, x0, alpha, dalpha)
        ctx.chunk_size = chunk_size
        ctx.has_bias = bias is not None
        return loss.view(z.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, z, x0, alpha, dalpha = ctx.saved_tensors
        N, cs = z.numel(), ctx.chunk_size
        h2 = hidden.reshape(N, hidden.shape[-1])
        zf, xf, af, df = z.reshape(N), x0.reshape(N), alpha.reshape(N), dalpha.reshape(N)
        go = grad_loss.reshape(N)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty_like(h2) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b and ctx.has_bias else None
        w32 = weight.float() if need_h else None
        for s in range(0, N, cs):
            e = min(N, s + cs)
            _, g = _chunk_loss_grad(h2, weight, bias, zf, xf, af, df, s, e)
            g.mul_(go[s:e].unsqueeze(-1))
            _add_chunk_grads(g, h2, w32, grad_h, grad_w, grad_b, s, e)
        return (
            grad_h.view(hidden.shape) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None, None, None, None, None,
        )


class _LinearUsdmLossReduced(torch.autograd.Function):
    """sum (or mean) of usdm_loss(hidden @ weight.T + bias, ...), chunk by chunk,
    with the gradients computed in the forward (as Liger's fused linear cross
    entropy): a reduced loss's grad_output is one scalar c, so per chunk the
    kernel's d loss / d logits G (scaled by 1/N for the mean) goes straight into
    grad_hidden = G @ weight, grad_weight += G^T @ hidden, grad_bias += sum of G's
    rows, and backward only multiplies them by c: one logits GEMM and one kernel
    call per chunk instead of two of each. Holds the float32 gradients of hidden
    and weight from forward to backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, z, x0, alpha, dalpha, chunk_size, mean):
        N = z.numel()
        h2 = hidden.reshape(N, hidden.shape[-1])
        zf, xf, af, df = z.reshape(N), x0.reshape(N), alpha.reshape(N), dalpha.reshape(N)
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad_h = torch.empty(h2.shape, dtype=torch.float32, device=h2.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        w32 = weight.float() if need_h else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for s in range(0, N, chunk_size):
            e = min(N, s + chunk_size)
            loss, g = _chunk_loss_grad(h2, weight, bias, zf, xf, af, df, s, e)
            total += loss.sum(dtype=torch.float64)
            if mean:
                g.div_(N)
            _add_chunk_grads(g, h2, w32, grad_h, grad_w, grad_b, s, e)
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.meta = (hidden.shape, hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return (total / N if mean else total).float()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("duo_fast: linear_usdm_loss(..., reduction=...) supports a single backward (its gradients "
                               "were computed in the forward); use reduction='none' for retain_graph / double backward")
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        shape, h_dtype, w_dtype, b_dtype = ctx.meta
        c = grad_loss.float()  # a 0-dim tensor: no host read (no CUDA sync)
        return (
            grad_h.mul_(c).to(h_dtype).view(shape) if grad_h is not None else None,
            grad_w.mul_(c).to(w_dtype) if grad_w is not None else None,
            grad_b.mul_(c).to(b_dtype) if grad_b is not None else None,
            None, None, None, None, None, None,
        )


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
    check_tensor(hidden, "hidden")
    check_tensor(weight, "weight")
    if not hidden.is_floating_point() or not weight.is_floating_point():
        raise TypeError("duo_fast: hidden and weight must be floating tensors")
    if weight.dim() != 2 or hidden.dim() < 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"duo_fast: weight must be [K, d] with d = hidden.size(-1); got weight {tuple(weight.shape)}, hidden {tuple(hidden.shape)}"
        )
    if bias is not None:
        check_tensor(bias, "bias")
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"duo_fast: bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    z, x0 = token_ids(z, "z"), token_ids(x0, "x0")
    _check_ids_like(hidden, "hidden", z, x0)
    K = check_vocab(weight.shape[0], "weight.size(0) (the vocabulary size)")
    if chunk_size is None:
        chunk_size = _default_chunk_size(K, weight.shape[1])
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"duo_fast: chunk_size must be a positive int, got {chunk_size!r}")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"duo_fast: reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
    a = per_token_level(alpha, "alpha", z, "z")
    d = per_token_level(dalpha, "dalpha", z, "z")
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if reduction != "none" and needs_grad and not torch.compiler.is_compiling():
        return _LinearUsdmLossReduced.apply(hidden, weight, bias, z, x0, a, d, chunk_size, reduction == "mean")
    loss = _LinearUsdmLoss.apply(hidden, weight, bias, z, x0, a, d, chunk_size)
    return loss if reduction == "none" else loss.sum() if reduction == "sum" else loss.mean()
