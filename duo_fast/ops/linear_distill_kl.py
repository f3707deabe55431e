"""linear_distill_kl: the distillation KL from the hidden states of the student and
the teacher through their output layers, chunk by chunk, so that neither model's
[N, K] logits exist (docs/math.md §3; docs/linear_ops.md)."""

from __future__ import annotations

import functools

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import check_same_device
from ._linear_chunks import check_chunk_size, check_linear, check_reduction, flat_rows, kernel_logits, linear_rows
from .distill_kl import _DIRECTIONS


def _kl_rows(logits, s, e, compute_grad, bufs, teacher_h2, teacher_weight, teacher_bias, *, direction):
    """The row op of linear_distill_kl (ops/_linear_chunks.py): the teacher's
    logits of tokens [s, e) (without a graph, in the pass's "teacher" buffer),
    then the fused KL kernel."""
    with torch.no_grad():
        teacher = bufs.linear("teacher", teacher_h2[s:e], teacher_weight, teacher_bias)
    return bufs.value_grad(torch.ops.duo_fast.distill_kl, kernel_logits(logits), kernel_logits(teacher), direction,
                           compute_grad=compute_grad)


def linear_distill_kl(
    student_hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    direction: str = "bwd",
    *,
    chunk_size: int | None = None,
    reduction: str = "none",
) -> torch.Tensor:
    """``distill_kl(student_hidden @ weight.T + bias, teacher_hidden @
    teacher_weight.T + teacher_bias, direction)`` (docs/math.md §3) without ever holding
    either ``[N, K]`` logits: tokens are processed in chunks of ``chunk_size``
    (default: ~64 MiB of float32 logits per chunk), as :func:`linear_usdm_loss`.

    ``direction="bwd"``: KL(pS || pT) per token; ``"fwd"``: KL(pT || pS).
    ``student_hidden``: ``[..., d]``; ``weight``: ``[K, d]``; ``bias``: ``[K]`` or
    None; ``teacher_hidden``: ``[..., d_t]`` of the student's leading shape,
    ``teacher_weight``: ``[K, d_t]``, ``teacher_bias``: ``[K]`` or None (the
    teacher may have another width and dtype). float32 or bfloat16 / float16
    (each chunk's logits formed in that dtype and read natively; KL math in
    float64 on CPU, float32 on CUDA); float64 logits are read as float32.
    Differentiable w.r.t. the student's hidden, weight and bias; the teacher is
    used without a graph (``no_grad``: no gradient, nothing kept for it).

    ``reduction``: ``"none"`` (default) returns the per-token ``[...]`` float32
    KL and recomputes each chunk's logits (student and teacher) in backward (any
    ``grad_output``, retain_graph, torch.compile); ``"sum"`` / ``"mean"`` return
    the scalar and, when a gradient is needed, compute the gradients in the
    forward, chunk by chunk (one GEMM per model and one kernel call per chunk;
    the float32 gradients of hidden and weight are held until backward, which
    only scales them; one backward only).

    Peak extra memory O(chunk_size * K) (a chunk's student and teacher logits and
    the gradient of the student's), independent of N, plus the parameter
    gradients. Masked vocabularies and bad values as :func:`distill_kl`: a
    ``-inf`` bias entry is probability 0; NaN / +inf in hidden, weight or bias
    give NaN KLs and gradients (no error)."""
    K = check_linear(student_hidden, weight, bias, ("student_hidden", "weight", "bias"))
    K_t = check_linear(teacher_hidden, teacher_weight, teacher_bias,
                       ("teacher_hidden", "teacher_weight", "teacher_bias"))
    if K_t != K:
        raise ValueError(f"duo_fast: teacher_weight has {K_t} rows (its vocabulary), expected weight's {K}")
    if tuple(teacher_hidden.shape[:-1]) != tuple(student_hidden.shape[:-1]):
        raise ValueError(f"duo_fast: teacher_hidden has shape {tuple(teacher_hidden.shape)}, expected the leading "
                         f"shape of student_hidden, {tuple(student_hidden.shape[:-1])}")
    check_same_device(("student_hidden", student_hidden), ("teacher_hidden", teacher_hidden))
    if direction not in _DIRECTIONS:
        raise ValueError(f"duo_fast: direction must be 'bwd' or 'fwd', got {direction!r}")
    chunk_size = check_chunk_size(chunk_size, K, max(weight.shape[1], teacher_weight.shape[1]))
    reduction = check_reduction(reduction)
    teacher = (flat_rows(teacher_hidden.detach()), teacher_weight.detach(),
               None if teacher_bias is None else teacher_bias.detach())
    row_op = functools.partial(_kl_rows, direction=_DIRECTIONS[direction])
    return linear_rows("linear_distill_kl", row_op, student_hidden, weight, bias, teacher, chunk_size=chunk_size,
                       reduction=reduction, names=("student_hidden", "weight", "bias", "teacher_hidden",
                                                                   "teacher_weight", "teacher_bias"))
