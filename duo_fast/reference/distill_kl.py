"""Oracle of distill_kl (docs/math.md §3): the per-token KL of two softmax laws."""

import math

import torch

from ._common import _F64


def _kl_terms(lw, lo):
  """w (log w - log o) per entry with 0 log 0 = 0 (a -inf logit is probability
  0): 0 where log w = -inf, +inf where only log o = -inf. The masked log-ratio
  keeps autograd finite there (no 0 * inf in the backward of the product)."""
  zero_w = lw == -math.inf
  d = torch.where(zero_w, torch.zeros_like(lw), lw - lo)
  return lw.exp() * d


def distill_kl(student_logits, teacher_logits, direction="bwd"):
  """Per-token KL [B, L]: bwd = KL(pS || pT), fwd = KL(pT || pS).

  Gradient flows to the student only (the teacher is detached). A -inf logit
  is probability 0 with 0 log 0 = 0; a zero of the other law where the
  weighting one is positive gives +inf.
  """
  ls = torch.log_softmax(student_logits.to(_F64), -1)
  lt = torch.log_softmax(teacher_logits.detach().to(_F64), -1)
  if direction == "bwd":
    return _kl_terms(ls, lt).sum(-1)
  if direction == "fwd":
    return _kl_terms(lt, ls).sum(-1)
  raise ValueError(direction)
