"""Oracle of softmax_embed (docs/math.md §7): the soft embedding of
DiffusionGemma's self-conditioning, in float64."""

import torch

from .canvas_step import canvas_probs


def softmax_embed(logits, embedding, temperature=1.0, scale=1.0):
  """softmax(logits / T) @ embedding * scale, float64 [..., d] (every entry: the
  exact weighted sum, no tail dropped)."""
  return canvas_probs(logits, temperature) @ embedding.to(torch.float64) * scale
