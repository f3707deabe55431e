"""Oracle of linear_distill_kl (docs/math.md §3): distill_kl of the two output layers'
logits hidden @ weight.T + bias, formed in full in float64."""

from ._common import _F64
from .distill_kl import distill_kl


def _logits(hidden, weight, bias):
  logits = hidden.to(_F64) @ weight.to(_F64).t()
  return logits if bias is None else logits + bias.to(_F64)


def linear_distill_kl(student_hidden, weight, bias, teacher_hidden, teacher_weight,
                      teacher_bias, direction="bwd"):
  """Per-token KL [B, L] of the student's and the teacher's logits (biases may be
  None), in float64, differentiable w.r.t. the student's hidden, weight and bias
  (the teacher is detached)."""
  teacher = _logits(teacher_hidden, teacher_weight, teacher_bias).detach()
  return distill_kl(_logits(student_hidden, weight, bias), teacher, direction)
