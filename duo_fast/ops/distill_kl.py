"""distill_kl: the per-token KL between student and teacher softmax, fused with its
gradient (docs/math.md §3)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import check_same_device, check_tensor
from ._common import _LOGIT_DTYPES, check_no_func_transform
from ._inplace_grad import (_FusedGradInplace, _fused_grad_backward, _fused_grad_fake, _fused_grad_setup_context,
                           _fused_value_fake)


_DIRECTIONS = {"bwd": 0, "fwd": 1}


def distill_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, direction: str = "bwd", *, inplace_grad: bool = False
) -> torch.Tensor:
    """Per-token KL between the student's and the teacher's softmax (docs/math.md §3):
    ``direction="bwd"``: KL(pS || pT); ``"fwd"``: KL(pT || pS). Logits
    ``[..., K]`` float32, bfloat16 or float16, each law its own dtype, read
    natively (no float32 copy; math in float64 on CPU, float32 on CUDA); returns
    ``[...]`` float32, the gradient in the student's dtype. Differentiable w.r.t. ``student_logits`` only
    (``teacher_logits`` is a fixed target: detached; first order: differentiating
    the gradient again raises); the
    gradient is computed in the same pass as the KL when the student requires
    grad (no ``[N, K]`` temporaries besides the gradient itself).

    Memory, as :func:`usdm_loss`: by default backward returns ``gradient *
    grad_output`` out of place (two ``[N, K]`` tensors at its peak; with 16-bit
    logits the product is float32, cast back by autograd: 5x the student's
    bytes); ``inplace_grad=True`` hands the forward's gradient buffer to autograd,
    scaled in place in its own dtype (the same bits): peak extra memory the
    gradient alone, one backward only, ignored inside ``torch.compile``.

    Masked vocabularies: a ``-inf`` logit is probability 0 with ``0 log 0 = 0``,
    so an entry that is 0 in the weighting law (the student for ``"bwd"``, the
    teacher for ``"fwd"``) adds nothing and its gradient is 0; a 0 in the other
    law where the weighting law is positive gives ``+inf`` (for ``"bwd"``: a
    teacher 0 where the student is positive), as the math says, and the
    gradient of an infinite ``"bwd"`` KL is not finite.

    Bad values propagate (docs/bad_values.md): a row of either
    logits with a NaN or +inf entry, or entirely ``-inf``, gives a NaN KL and
    a NaN gradient row, as ``torch.nn.functional.kl_div`` of log_softmax does;
    no error (AMP's GradScaler skips such steps)."""
    check_tensor(student_logits, "student_logits", _LOGIT_DTYPES)
    check_tensor(teacher_logits, "teacher_logits", _LOGIT_DTYPES)
    check_no_func_transform("distill_kl", student_logits, teacher_logits)
    if direction not in _DIRECTIONS:
        raise ValueError(f"duo_fast: direction must be 'bwd' or 'fwd', got {direction!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"duo_fast: teacher_logits has shape {tuple(teacher_logits.shape)}, expected student_logits' shape {tuple(student_logits.shape)}"
        )
    if student_logits.dim() < 1 or student_logits.shape[-1] < 2:
        raise ValueError(f"duo_fast: student_logits must be [..., K] with K >= 2, got shape {tuple(student_logits.shape)}")
    check_same_device(("student_logits", student_logits), ("teacher_logits", teacher_logits))
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    if inplace_grad and compute_grad and not torch.compiler.is_compiling():
        return _FusedGradInplace.apply("distill_kl", "student_logits", {}, torch.ops.duo_fast.distill_kl.default,
                                       student_logits, teacher_logits.detach(), _DIRECTIONS[direction])
    kl, _ = torch.ops.duo_fast.distill_kl.default(
        student_logits, teacher_logits.detach(), _DIRECTIONS[direction], compute_grad
    )
    return kl


@torch.library.register_fake("duo_fast::distill_kl")
def _distill_kl_fake(student, teacher, direction, compute_grad):
    return _fused_grad_fake(student, compute_grad)


@torch.library.register_fake("duo_fast::distill_kl.into")
def _distill_kl_into_fake(student, teacher, direction, grad):
    return _fused_value_fake(student)


def _distill_kl_backward(ctx, grad_kl, grad_grad):
    return _fused_grad_backward(ctx, grad_kl, "distill_kl", "student_logits", {}, 4)


torch.library.register_autograd("duo_fast::distill_kl", _distill_kl_backward, setup_context=_fused_grad_setup_context)
