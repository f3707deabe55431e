"""canvas_step: DiffusionGemma's per-row draw, argmax and entropy (docs/math.md §7).

DiffusionGemma (Google, 2026; transformers' ``models/diffusion_gemma``) is a
block-diffusion decoder that denoises a canvas of tokens corrupted by uniform
random tokens and conditions each step on the previous step's logits. Per step
and canvas row it needs one draw from ``softmax(logits / T)``, the argmax and the
entropy (acceptance and stopping); this op computes them without any
``[rows, V]`` temporary (:mod:`duo_fast.integrations.diffusion_gemma` patches
transformers onto it and onto :func:`duo_fast.softmax_embed`).
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._random import philox_seed
from ._common import _logits_and_temperature, check_no_func_transform, register_no_autograd


def canvas_step(
    logits: torch.Tensor,
    *,
    temperature=1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` ``[..., V]``, with ``p = softmax(logits / temperature)``:
    ``(sample, argmax, entropy)``: one draw from ``p`` (int64), the argmax (int64;
    ties: the lowest id, as ``torch.argmax``) and the entropy of ``p`` (float32),
    each of the leading shape. DiffusionGemma's ``torch.multinomial(softmax(...))``,
    ``argmax`` and ``Categorical(logits).entropy()`` without any ``[rows, V]``
    temporary: two reads of the logits, O(rows) extra memory (the CPU kernel also
    keeps one scratch row of V floats per thread).

    ``logits``: float32, bfloat16 or float16 (read natively, computed in
    float32); ``temperature``: a float or a tensor per row (``[B]``, ``[B, 1]``
    or the leading shape), finite and > 0. The draw is exact (inverse CDF
    against float64 running sums with one 53-bit uniform, as
    :func:`duo_fast.sample_step`; with ``seed`` it is the same draw as
    ``sample_step(logits, z, 0, 1, temperature=T, seed=seed)``, the noise-removal
    step, up to the rounding of the sums). The entropy is
    ``log1p(delta) + b / (1 + delta)`` with ``delta = S - 1`` and ``b = -sum w
    log w`` over ``w = exp((x - max) / T)``: no cancellation, ~1e-7 relative.
    Randomness per :mod:`duo_fast._random` (``seed`` or ``generator``).

    Bad values: a row with NaN, +inf or no finite logit raises, naming
    ``logits`` (CPU: at the call; CUDA: that row gets sample = argmax = 0 and a
    NaN entropy, and the next duo_fast CUDA call raises); ``-inf`` entries are
    probability 0 (never drawn). Not differentiable: a backward that reaches
    ``logits`` or ``temperature`` raises, naming it.
    """
    check_no_func_transform("canvas_step", logits, temperature)
    temp = _logits_and_temperature(logits, temperature)
    key = philox_seed(logits.device, generator, seed)
    return torch.ops.duo_fast.canvas_step.default(logits, temp, key, 0)


@torch.library.register_fake("duo_fast::canvas_step")
def _canvas_step_fake(logits, temperature, seed, offset):
    lead = logits.shape[:-1]
    return (logits.new_empty(lead, dtype=torch.int64), logits.new_empty(lead, dtype=torch.int64),
            logits.new_empty(lead, dtype=torch.float32))


register_no_autograd("duo_fast::canvas_step", "canvas_step", {0: "logits", 1: "temperature"})
