"""softmax_embed: the soft embedding of DiffusionGemma's self-conditioning,
``softmax(logits / T) @ E * scale``, without the ``[rows, V]`` probabilities
(docs/math.md §7)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import FLOAT32_MAX, check_real, check_same_device, check_tensor
from ._common import _EMBEDDING_DTYPES, _logits_and_temperature, check_no_func_transform


def softmax_embed(logits: torch.Tensor, embedding: torch.Tensor, *, temperature=1.0, scale: float = 1.0) -> torch.Tensor:
    """``softmax(logits / temperature) @ embedding * scale`` without the ``[rows, V]``
    probabilities: the soft embedding of DiffusionGemma's self-conditioning
    (``softmax(self_conditioning_logits) @ embed_tokens.weight * embed_scale``).
    Returns ``[..., d]`` in ``embedding``'s dtype.

    ``logits`` ``[..., V]`` float32, bfloat16 or float16 (read natively);
    ``embedding`` ``[V, d]`` float32, bfloat16 or float16 (read natively, never
    copied whole); ``temperature`` a float or per row (as :func:`canvas_step`);
    ``scale`` a float with ``|scale| <= 3.4e38`` (a float32). Like attention with the logits as scores and
    ``embedding`` as values: per row the max, then tiles of V (CPU: ATen GEMMs on
    tiles, bf16 GEMMs for a bf16 embedding; CUDA: tensor cores for a bf16
    embedding on sm_80+, float kernels otherwise). Entries whose weight is below
    ``2^-24 / V`` of the row's largest are dropped (their total mass is below
    ``2^-24``; the result moves by at most ``2^-23 max|E| scale`` per column), so
    a confident row costs a few rows of ``embedding`` instead of all of them
    (csrc/include/duo_fast/softmax_embed.h). Accuracy: float32 accumulation;
    with a bf16 embedding the CPU and tensor-core paths round the probabilities
    to bf16, as transformers' own soft embedding does.

    Forward only (the model runs it under ``torch.no_grad``): a backward through
    it raises. Bad values as :func:`canvas_step`: a logits row with NaN, +inf or
    no finite entry raises, naming ``logits`` (CUDA: a NaN row, and the next
    duo_fast CUDA call raises); NaN in ``embedding`` propagates.
    """
    check_no_func_transform("softmax_embed", logits, embedding, temperature)
    check_tensor(embedding, "embedding", _EMBEDDING_DTYPES)
    if embedding.dim() != 2:
        raise ValueError(f"duo_fast: embedding must be [vocab_size, d], got shape {list(embedding.shape)}")
    temp = _logits_and_temperature(logits, temperature)
    check_same_device(("logits", logits), ("embedding", embedding))
    if embedding.shape[0] != logits.shape[-1]:
        raise ValueError(f"duo_fast: embedding has {embedding.shape[0]} rows, expected one per logit: logits has "
                         f"shape {list(logits.shape)}")
    scale = check_real(scale, "scale", -FLOAT32_MAX, FLOAT32_MAX, why="the output is scaled in float32")
    return torch.ops.duo_fast.softmax_embed.default(logits, embedding, temp, scale)


@torch.library.register_fake("duo_fast::softmax_embed")
def _softmax_embed_fake(logits, embedding, temperature, scale):
    return logits.new_empty((*logits.shape[:-1], embedding.shape[1]), dtype=embedding.dtype)


def _softmax_embed_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)


_INPUTS = ("logits", "embedding", "temperature")


def _softmax_embed_backward(ctx, grad):
    wrt = ", ".join(n for n, need in zip(_INPUTS, ctx.needs_input_grad) if need)
    raise RuntimeError(
        f"duo_fast: softmax_embed is forward only (DiffusionGemma runs its soft embedding under torch.no_grad): "
        f"expected {wrt} not to require grad (pass .detach()), got a backward that reaches {wrt}. For gradients use "
        "torch.softmax(logits / T, -1) @ embedding * scale"
    )


torch.library.register_autograd(
    "duo_fast::softmax_embed", _softmax_embed_backward, setup_context=_softmax_embed_setup_context
)
