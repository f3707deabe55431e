"""curriculum_topk and curriculum_topk_embed: the Duo++ top-k curriculum input
(docs/math.md §2e)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import check_vocab, token_ids
from .._random import philox_seed
from ._common import _check_x0_embedding, _curriculum_levels


_ZT_RULES = {"exact": 0, "reference": 1}


def _check_k(k, vocab_size: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"duo_fast: k must be an int, got {type(k).__name__}")
    if not 1 <= k <= vocab_size - 1:
        raise ValueError(f"duo_fast: k must be in [1, vocab_size - 1] = [1, {vocab_size - 1}], got {k}")
    return k


def _zt_rule(zt_rule: str) -> int:
    if zt_rule not in _ZT_RULES:
        raise ValueError(f"duo_fast: zt_rule must be 'exact' or 'reference', got {zt_rule!r}")
    return _ZT_RULES[zt_rule]


def curriculum_topk(
    x0: torch.Tensor,
    gamma,
    inv_tau,
    k: int,
    vocab_size: int,
    *,
    zt_rule: str = "exact",
    generator: torch.Generator | None = None,
    seed: int | None = None,
):
    """The Duo++ top-k curriculum input (docs/math.md §2e): per token the k largest entries
    of the tempered Gaussian latent ``w = a~ onehot(x0) + s~ eps`` without drawing
    the K noises, as ``(ids [B, L, k] int64, weights [B, L, k] float32, z_t [B, L])``.

    ``x0``: ``[B, L]`` int64; ``gamma``: Gaussian log-noise level and ``inv_tau``
    (1/temperature, > 0) per row, per token or a float. Any ``1 <= k <=
    vocab_size - 1``. Order statistics from the top (Renyi), the x-entry, the
    tail below the k-th by its expectation, the tempered softmax weights
    (csrc/include/duo_fast/curriculum_topk.h for the equations). ``ids`` are a uniformly
    random ordered k-tuple of distinct ids != x0 (every id equally likely at
    every rank), the last one x0 when the x-entry is in the top k.
    ``zt_rule="exact"``: ``z_t = x0`` iff the x-entry is the largest (so
    ``P(z_t = x0) = alpha(gamma)``'s pt); ``"reference"``: ``z_t = x0`` iff it
    is in the top k, as ``utils.sample_tempered_softmax_topk`` (biased towards
    x0 for k >= 2). With ``seed`` the ids and z_t are identical on CPU (any
    thread count) and CUDA; weights agree to rounding. Not differentiable.
    ``x0`` int64 or int32 (``ids`` and ``z_t`` come back in its dtype).
    Bad values: ``gamma`` must be finite and ``inv_tau`` finite and > 0 (else
    an error naming them, docs/bad_values.md).
    """
    ids = token_ids(x0, "x0")
    check_vocab(vocab_size)
    k = _check_k(k, vocab_size)
    g, it = _curriculum_levels(x0, gamma, inv_tau)
    key = philox_seed(x0.device, generator, seed)
    out, weights, z_t = torch.ops.duo_fast.curriculum_topk.default(ids, g, it, k, vocab_size, _zt_rule(zt_rule), key, 0)
    return out.to(x0.dtype), weights, z_t.to(x0.dtype)


@torch.library.register_fake("duo_fast::curriculum_topk")
def _curriculum_topk_fake(x0, gamma, inv_tau, k, vocab_size, zt_rule, seed, offset):
    shape = (*x0.shape, k)
    return x0.new_empty(shape), x0.new_empty(shape, dtype=torch.float32), x0.new_empty(x0.shape)


def curriculum_topk_embed(
    x0: torch.Tensor,
    gamma,
    inv_tau,
    k: int,
    embedding: torch.Tensor,
    *,
    zt_rule: str = "exact",
    generator: torch.Generator | None = None,
    seed: int | None = None,
):
    """:func:`curriculum_topk` fused with the weighted embedding bag
    ``h = sum_i w_i embedding[id_i]`` (docs/math.md §2e step 6): returns ``(h [B, L, d],
    z_t)``, ``h`` in ``embedding``'s dtype (float32, bfloat16 or float16;
    accumulated in float32), differentiable w.r.t. ``embedding``.
    ``vocab_size = embedding.shape[0]``. Backward scatters ``w_i grad_h`` into
    a float32 ``[K, d]`` gradient: on CPU always deterministic (entries
    counting-sorted by id, each row written once, same bits for any thread
    count); on CUDA with atomics, or deterministic (stable sort by id, one
    writer per row, no atomics) when ``torch.use_deterministic_algorithms(True)``.
    The CPU forward sums each ``h`` row in ascending id order (id-sorted bag;
    the per-token bag, in slot order, for tiny bags ``N k < 0.05 K``;
    ``DUO_FAST_TOPK_BAG=sorted|token`` forces one). The CPU gradient buffer
    (16 MiB and more) comes from duo_fast's cache of freed gradients, reused
    across steps (:func:`duo_fast.empty_cache`).
    Bad values: levels as :func:`curriculum_topk` (raise); a NaN / inf
    embedding row gives NaN / inf in the ``h`` of the tokens whose bag holds
    it (propagates, no error). ``x0`` int64 or int32 (``z_t`` in its dtype).
    """
    K = _check_x0_embedding(x0, embedding)
    k = _check_k(k, K)
    g, it = _curriculum_levels(x0, gamma, inv_tau)
    key = philox_seed(x0.device, generator, seed)
    h, z_t, _, _ = torch.ops.duo_fast.curriculum_topk_embed.default(
        token_ids(x0, "x0"), g, it, k, embedding, _zt_rule(zt_rule), key, 0
    )
    return h, z_t.to(x0.dtype)


@torch.library.register_fake("duo_fast::curriculum_topk_embed")
def _curriculum_topk_embed_fake(x0, gamma, inv_tau, k, embedding, zt_rule, seed, offset):
    shape = (*x0.shape, k)
    h = embedding.new_empty((*x0.shape, embedding.shape[1]))
    return h, x0.new_empty(x0.shape), x0.new_empty(shape), x0.new_empty(shape, dtype=torch.float32)


def _topk_embed_setup_context(ctx, inputs, output):
    _, _, ids, weights = output
    ctx.save_for_backward(ids, weights)
    embedding = inputs[4]
    ctx.vocab_size, ctx.embedding_dtype = embedding.shape[0], embedding.dtype
    ctx.set_materialize_grads(False)


def _topk_embed_backward(ctx, grad_h, grad_z, grad_ids, grad_weights):
    if grad_h is None or not ctx.needs_input_grad[4]:
        return None, None, None, None, None, None, None, None
    ids, weights = ctx.saved_tensors
    deterministic = torch.are_deterministic_algorithms_enabled()
    grad = torch.ops.duo_fast.topk_bag_backward.default(grad_h, ids, weights, ctx.vocab_size, deterministic)
    return None, None, None, None, grad.to(ctx.embedding_dtype), None, None, None


torch.library.register_autograd(
    "duo_fast::curriculum_topk_embed", _topk_embed_backward, setup_context=_topk_embed_setup_context
)


@torch.library.register_fake("duo_fast::topk_bag_backward")
def _topk_bag_backward_fake(grad_h, ids, weights, vocab_size, deterministic):
    return grad_h.new_empty((vocab_size, grad_h.shape[-1]), dtype=torch.float32)
