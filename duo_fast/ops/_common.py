"""Dtype sets and argument checks shared by the op wrappers of this package."""

from __future__ import annotations

import torch

from .._checks import check_same_device, check_temperature, check_tensor, check_vocab, per_token_level, token_ids


_FLOAT_LEVELS = (torch.float32, torch.float64)
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EMBEDDING_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_ids_like(t: torch.Tensor, t_name: str, z: torch.Tensor, x0: torch.Tensor | None = None) -> None:
    """z (and x0) must have t's leading shape ([..., K] or [..., d]) and device."""
    lead = tuple(t.shape[:-1])
    for ids, name in ((z, "z"), (x0, "x0")):
        if ids is None:
            continue
        if tuple(ids.shape) != lead:
            raise ValueError(f"duo_fast: {name} has shape {tuple(ids.shape)}, expected the leading shape of {t_name}, {lead}")
        check_same_device((t_name, t), (name, ids))


def _curriculum_levels(x0: torch.Tensor, gamma, inv_tau) -> tuple[torch.Tensor, torch.Tensor]:
    """gamma and inv_tau (tensors or Python floats) as float64 levels of x0's shape."""
    # torch.full, not torch.tensor: no host-to-device copy (a synchronization on CUDA)
    as_level = lambda v: v if isinstance(v, torch.Tensor) else torch.full((), float(v), dtype=torch.float64, device=x0.device)  # noqa: E731
    return per_token_level(as_level(gamma), "gamma", x0), per_token_level(as_level(inv_tau), "inv_tau", x0)


def _check_x0_embedding(x0: torch.Tensor, embedding: torch.Tensor) -> int:
    """x0 int64 / int32 and embedding [K, d] (float32/bf16/fp16) on its device; returns K."""
    token_ids(x0, "x0")
    check_tensor(embedding, "embedding", _EMBEDDING_DTYPES)
    if embedding.dim() != 2:
        raise ValueError(f"duo_fast: embedding must be [vocab_size, d], got shape {tuple(embedding.shape)}")
    check_same_device(("x0", x0), ("embedding", embedding))
    return check_vocab(embedding.shape[0], "embedding.shape[0] (the vocabulary size)")


# ---- what the ops do not differentiate: an error naming it, never a silent zero ----------


def second_order_error(op: str, wrt: str) -> RuntimeError:
    """The error of an op without a second derivative whose gradient w.r.t. ``wrt`` is
    asked to be differentiable (create_graph=True) or is differentiated again."""
    return RuntimeError(
        f"duo_fast: {op} has no second-order gradient: expected a first-order backward, got one that builds a "
        f"graph of its gradient w.r.t. {wrt} to differentiate it again (torch.autograd.grad(..., create_graph=True): "
        "a gradient penalty, a Hessian-vector product). For second-order terms use a differentiable formula "
        "(duo_fast.reference has the float64 one of each op)"
    )


def check_not_differentiated(ctx, op: str, names: dict[int, str]) -> None:
    """In backward: raise if autograd asks for a gradient w.r.t. an input the op does
    not differentiate (``names``: input index -> argument name) instead of returning a
    silent None (levels, schedules, the posterior's logits)."""
    for i, name in names.items():
        if ctx.needs_input_grad[i]:
            raise RuntimeError(
                f"duo_fast: {op} is not differentiable w.r.t. {name}: expected {name} not to require grad (pass "
                f"{name}.detach()), got one that requires grad, and a backward that reaches it"
            )


def register_no_autograd(qualname: str, op: str, names: dict[int, str]) -> None:
    """An autograd formula for an op with floating outputs that it does not
    differentiate (``names``: input index -> name): a backward that reaches it
    raises naming the argument, where torch's fallback would warn and return None."""

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)

    def backward(ctx, *grads):
        check_not_differentiated(ctx, op, names)
        return (None,) * len(ctx.needs_input_grad)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def register_first_order_only(qualname: str, op: str, wrt: str) -> None:
    """The backward op of a differentiable op (its gradient w.r.t. ``wrt``): a
    backward through its output (a second-order gradient) raises."""

    def backward(ctx, *grads):
        raise second_order_error(op, wrt)

    torch.library.register_autograd(qualname, backward, setup_context=lambda ctx, inputs, output: None)


class _FirstOrderOnly(torch.autograd.Function):
    """apply(op, wrt, anchor, *grads) -> grads (aliases): gradients computed without a
    graph, which raise ``second_order_error`` when differentiated again. ``anchor``
    (an input of the op that requires grad) ties them into the graph, so that a
    backward through them reaches this node instead of silently skipping it."""

    @staticmethod
    def forward(ctx, op, wrt, anchor, *grads):
        ctx.op, ctx.wrt = op, wrt
        return tuple(g.view_as(g) if g is not None else None for g in grads)

    @staticmethod
    def backward(ctx, *unused):
        raise second_order_error(ctx.op, ctx.wrt)


def first_order_only(op: str, wrt: str, anchor, *grads):
    """``grads`` as they are, unless the backward runs under create_graph=True: then
    through :class:`_FirstOrderOnly` (their use is free; differentiating them raises)."""
    if not torch.is_grad_enabled() or anchor is None or not anchor.requires_grad:
        return grads
    return _FirstOrderOnly.apply(op, wrt, anchor, *grads)


_FUNC_TRANSFORMS = ("Grad", "Jvp")


def check_no_func_transform(op: str, *tensors) -> None:
    """torch.func.grad / vjp / jacrev / jacfwd / jvp / hessian over an op: the ops'
    autograd formulas are not functorch-aware (their saved gradients and device
    kernels live outside functorch's levels), so refuse with a clear error instead
    of torch's internal one (or, for the ops without a formula, a silent zero).
    vmap alone works (torch's per-sample fallback)."""
    if torch.compiler.is_compiling():
        return
    functorch = torch._C._functorch
    stack = functorch.get_interpreter_stack() or []
    if not any(i.key().name in _FUNC_TRANSFORMS for i in stack):
        return
    if any(isinstance(t, torch.Tensor) and functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        raise NotImplementedError(
            f"duo_fast: {op} does not support torch.func transforms that differentiate (torch.func.grad, vjp, "
            "jacrev, jacfwd, jvp, hessian): expected plain tensors, got tensors of a torch.func transform. "
            "Use torch.autograd.grad / .backward() (first order), or duo_fast.reference for torch.func"
        )


def _logits_and_temperature(logits, temperature) -> torch.Tensor:
    """canvas_step / softmax_embed: checks logits ([..., V], float32/bf16/fp16); returns the
    temperature (a float, or per row: [B], [B, 1] or the leading shape) as float64 of
    logits' leading shape."""
    check_tensor(logits, "logits", _LOGIT_DTYPES)
    if logits.dim() < 1:
        raise ValueError("duo_fast: logits must be [..., K], got a 0-dim tensor")
    check_vocab(logits.shape[-1], "logits.size(-1) (the vocabulary size)")
    lead = logits.select(-1, 0)  # a view: the leading shape and device
    if isinstance(temperature, torch.Tensor):
        check_same_device(("logits", logits), ("temperature", temperature))
        return per_token_level(temperature, "temperature", lead, "logits[..., 0]")
    t = check_temperature(temperature)
    # torch.full, not torch.tensor: no host-to-device copy (a synchronization on CUDA)
    return torch.full(lead.shape, t, dtype=torch.float64, device=logits.device)
