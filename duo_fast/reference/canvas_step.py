"""Oracle of canvas_step (docs/math.md §7): DiffusionGemma's per-row law
softmax(logits / T), its argmax and its entropy, written from the definitions in
float64 (inputs upcast). DiffusionGemma's own code (transformers
``models/diffusion_gemma``) is the other oracle: the integration tests run it on
the same logits."""

import torch

from ._common import _per_token
from .sample_step import sample_categorical


def _scaled(logits, temperature):
  """y = logits / T in float64, T a float or per row (scalar, [B], [B, 1], leading shape)."""
  x = logits.to(torch.float64)
  return x / _per_token(temperature, x[..., 0])[..., None]


def canvas_probs(logits, temperature=1.0):
  """p = softmax(logits / T) [..., V] float64 (-inf logits: probability 0)."""
  return torch.softmax(_scaled(logits, temperature), -1)


def canvas_entropy(logits, temperature=1.0):
  """H(p) of p = softmax(logits / T), float64 of the leading shape.

  From H = log S - sum_j w_j y_j / S with y_j = x_j / T - max, w_j = exp(y_j),
  S = sum w_j: log S as log1p(S - 1) with S - 1 summed without the max entry
  (a nearly one-hot row, S = 1 + 1e-30, keeps its digits; both terms are
  nonnegative, nothing cancels). Entries of weight 0 add 0 (0 log 0 = 0).
  """
  y = _scaled(logits, temperature)
  y = y - y.amax(-1, keepdim=True)
  w = y.exp()
  first = y.argmax(-1, keepdim=True)
  delta = w.scatter(-1, first, 0.0).sum(-1)  # every weight but the max entry's (exactly 1)
  b = torch.where(w > 0, -w * y, torch.zeros_like(w)).sum(-1)
  return torch.log1p(delta) + b / (1 + delta)


def canvas_argmax(logits):
  """The first index of the largest logit (torch.argmax's rule), int64."""
  return logits.to(torch.float64).argmax(-1)



def canvas_step(logits, temperature=1.0, generator=None):
  """(sample, argmax, entropy): one draw from p = softmax(logits / T) per row
  (sample_categorical: an exponential race in float64), the first index of the
  largest logit, H(p)."""
  return (sample_categorical(canvas_probs(logits, temperature), generator), canvas_argmax(logits),
          canvas_entropy(logits, temperature))
