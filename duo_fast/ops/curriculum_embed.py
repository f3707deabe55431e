"""curriculum_embed: the exact curriculum soft input (docs/math.md §2c, §2d)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import token_ids
from .._random import philox_seed
from ._common import _check_x0_embedding, _curriculum_levels


def curriculum_embed(
    x0: torch.Tensor,
    gamma,
    inv_tau,
    embedding: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    seed: int | None = None,
):
    """The exact curriculum soft input of Duo (docs/math.md §2d): ``h = softmax(w * inv_tau)
    @ embedding`` with the Gaussian latent ``w = a~ onehot(x0) + s~ eps`` over all
    K entries, and ``z_t = argmax w``. Returns ``(h [B, L, d], z_t [B, L])``,
    ``h`` in ``embedding``'s dtype (float32, bfloat16 or float16; math in
    float32 with scores in float64), differentiable w.r.t. ``embedding``.

    ``eps[token, j]`` is generated inside the kernel from Philox (docs/math.md §2c) and
    never stored: forward and backward regenerate it, like FlashAttention's
    scores (online softmax over tiles of K; CPU: BLAS GEMMs on tiles of
    P; backward from the saved row log-sum-exp). Memory O(N d + K d) (the
    embedding's float32 copy when it is not float32), never O(N K); the CPU
    gradient buffer (16 MiB and more) comes from duo_fast's cache of freed
    gradients, reused across steps (:func:`duo_fast.empty_cache`).
    ``gamma`` finite and ``inv_tau`` > 0 per row, per token or a float;
    ``inv_tau`` from 1 to 1e4 and beyond stay finite. With ``seed`` the
    outputs are identical on CPU (any thread count) and CUDA up to float
    rounding of the sums (z_t except at exact near-ties). ``x0`` int64 or
    int32 (``z_t`` in its dtype).

    Bad values: ``gamma`` must be finite and ``inv_tau`` finite and > 0
    (raise, docs/bad_values.md); a NaN or inf in ``embedding``
    gives NaN / inf in ``h`` (propagates, no error).

    Recomputation (``torch.utils.checkpoint``, or calling again): the noise is
    a function of the Philox key. With ``seed`` a recomputation draws the same
    noise. Without it the key is drawn from the generator: the default
    (global) generator is restored by checkpoint's ``preserve_rng_state=True``
    (its default), so the recomputation matches too; an explicit
    ``generator=`` is not restored by checkpoint and the recomputation gets new
    noise (wrong gradients): inside a checkpointed block pass ``seed=`` (e.g.
    drawn from that generator outside the block) or use the default generator.
    The same holds for every random op of this module.
    """
    _check_x0_embedding(x0, embedding)
    g, it = _curriculum_levels(x0, gamma, inv_tau)
    key = philox_seed(x0.device, generator, seed)
    h, z_t, _ = torch.ops.duo_fast.curriculum_embed.default(token_ids(x0, "x0"), g, it, embedding, key, 0)
    return h, z_t.to(x0.dtype)


@torch.library.register_fake("duo_fast::curriculum_embed")
def _curriculum_embed_fake(x0, gamma, inv_tau, embedding, seed, offset):
    h = embedding.new_empty((*x0.shape, embedding.shape[1]))
    return h, x0.new_empty(x0.shape), x0.new_empty(x0.shape, dtype=torch.float64)


def _curriculum_embed_setup_context(ctx, inputs, output):
    x0, gamma, inv_tau, embedding, seed, offset = inputs
    ctx.save_for_backward(x0, gamma, inv_tau, output[2])
    ctx.vocab_size, ctx.embedding_dtype, ctx.seed, ctx.offset = embedding.shape[0], embedding.dtype, seed, offset
    ctx.set_materialize_grads(False)


def _curriculum_embed_backward(ctx, grad_h, grad_z, grad_lse):
    if grad_h is None or not ctx.needs_input_grad[3]:
        return None, None, None, None, None, None
    x0, gamma, inv_tau, lse = ctx.saved_tensors
    grad = torch.ops.duo_fast.curriculum_embed_backward.default(
        grad_h, x0, gamma, inv_tau, lse, ctx.vocab_size, ctx.seed, ctx.offset
    )
    return None, None, None, grad.to(ctx.embedding_dtype), None, None


torch.library.register_autograd(
    "duo_fast::curriculum_embed", _curriculum_embed_backward, setup_context=_curriculum_embed_setup_context
)


@torch.library.register_fake("duo_fast::curriculum_embed_backward")
def _curriculum_embed_backward_fake(grad_h, x0, gamma, inv_tau, lse, vocab_size, seed, offset):
    return grad_h.new_empty((vocab_size, grad_h.shape[-1]), dtype=torch.float32)
