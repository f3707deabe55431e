"""Autograd of the fused (value, gradient) ops, usdm_loss and distill_kl: the
gradient w.r.t. the logits is computed in the forward, in the same row sweeps
as the value, and backward only scales it by grad_output -- out of place
(the default, a plain custom op) or in place (inplace_grad=True)."""

from __future__ import annotations

import torch

from ._common import check_not_differentiated, second_order_error


def _fused_value_fake(logits):
    """Fake value output ([...] float32) of the fused ops and of their ".into"
    overloads (the gradient written into the caller's tensor)."""
    return logits.new_empty(logits.shape[:-1], dtype=torch.float32)


def _fused_grad_fake(logits, compute_grad):
    """Fake outputs of the (value, d value / d logits) ops; mirrors csrc/fused_outputs.h."""
    grad = logits.new_empty(logits.shape) if compute_grad else logits.new_empty((0,))
    return _fused_value_fake(logits), grad


def _fused_grad_setup_context(ctx, inputs, output):
    """Shared by the ops that return (value, d value / d input) with the
    gradient computed in the forward (compute_grad is their last argument)."""
    ctx.compute_grad = inputs[-1]
    ctx.save_for_backward(output[1])
    # The second output is a by-product, never differentiated: no [N, K] zero
    # gradient for it, and no cotangent (its derivative would be the Hessian).
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def check_no_create_graph(op: str, wrt: str) -> None:
    """In the backward of an op without a second derivative: create_graph=True asks
    for a differentiable gradient, which would come back without the op's own
    second-order term (a silent error): raise at once instead."""
    if torch.is_grad_enabled():
        raise second_order_error(op, wrt)


def _fused_grad_backward(ctx, grad_value, op: str, wrt: str, levels: dict[int, str], n_inputs: int):
    """grad_input = saved gradient * grad_output (out of place: scaling the saved
    tensor in place breaks gradcheck's repeated backward and AOT partitioning;
    so backward holds two [N, K] tensors at its peak). ``levels``: the inputs the
    op does not differentiate (index -> name)."""
    check_not_differentiated(ctx, op, levels)
    check_no_create_graph(op, wrt)
    (grad,) = ctx.saved_tensors
    if not ctx.compute_grad:
        raise RuntimeError(f"duo_fast: torch.ops.duo_fast.{op} was called with compute_grad=False; call it with "
                           f"compute_grad=True to differentiate it w.r.t. {wrt} (duo_fast.{op} does)")
    if grad_value is None:
        return (None,) * n_inputs
    return (grad * grad_value.unsqueeze(-1),) + (None,) * (n_inputs - 1)


class _FusedGradInplace(torch.autograd.Function):
    """A fused (value, gradient) op (usdm_loss, distill_kl) with the lowest memory:
    the gradient computed in the forward is handed to autograd as the gradient
    itself (scaled in place by grad_output, skipped when grad_output is a broadcast
    1, e.g. after .sum()), so no second [N, K] tensor ever exists. The price:
    backward can run only once. apply(name, wrt, levels, op, input, *rest):
    op(input, *rest, True) -> (value, gradient w.r.t. input, named ``wrt``);
    ``levels``: index in ``rest`` -> name of the inputs the op does not
    differentiate."""

    @staticmethod
    def forward(ctx, name, wrt, levels, op, inp, *rest):
        value, grad = op(inp, *rest, True)
        ctx.grad = grad  # not save_for_backward: backward gives this very tensor away
        ctx.name, ctx.wrt, ctx.n_rest = name, wrt, len(rest)
        ctx.levels = {5 + i: n for i, n in levels.items()}  # index among forward's inputs
        return value

    @staticmethod
    def backward(ctx, grad_value):
        check_not_differentiated(ctx, ctx.name, ctx.levels)
        check_no_create_graph(ctx.name, ctx.wrt)
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                f"duo_fast: {ctx.name}(..., inplace_grad=True) supports a single backward (its gradient buffer was "
                "handed to autograd); use inplace_grad=False for retain_graph=True (neither has a second-order gradient)"
            )
        ctx.grad = None
        # Reading the value would synchronize on CUDA: there the scale is always applied.
        # An empty batch has nothing to scale.
        ones = grad_value.numel() == 0 or (
            grad_value.device.type == "cpu" and all(s == 0 for s in grad_value.stride())
            and bool(grad_value.reshape(-1)[0] == 1))
        if not ones:
            # in place in grad's dtype, the product taken in float32: a 16-bit gradient is
            # rounded once more, not grad_output first (found by the fuzzer: bf16 logits).
            # torch's in-place 16-bit x float32 product makes float32 temporaries of the
            # operand's size (4x the bf16 bytes), so a 16-bit gradient is
            # scaled by rows through one float32 buffer of 1 MiB (64 MiB on CUDA: fewer
            # launches): the same bits, O(K) extra memory.
            if grad.dtype == torch.float32:
                grad.mul_(grad_value.unsqueeze(-1))
            else:
                g2, v = grad.view(-1, grad.shape[-1]), grad_value.reshape(-1, 1)
                step = max(1, ((64 << 20) if grad.is_cuda else (1 << 20)) // (4 * g2.shape[1]))
                tmp = g2.new_empty((min(step, g2.shape[0]), g2.shape[1]), dtype=torch.float32)
                for i in range(0, g2.shape[0], step):
                    rows = g2[i:i + step]
                    t = tmp[:rows.shape[0]]
                    torch.mul(rows, v[i:i + step], out=t)
                    rows.copy_(t)
        return (None, None, None, None, grad) + (None,) * ctx.n_rest
