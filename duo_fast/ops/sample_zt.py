"""sample_zt: exact O(1) sampling of the uniform-state latent (docs/math.md §2a, §2b)."""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import check_vocab, per_token_level, token_ids
from .._random import philox_seed


def sample_zt(
    x0: torch.Tensor,
    gamma: torch.Tensor,
    vocab_size: int,
    *,
    gamma_s: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    seed: int | None = None,
):
    """The uniform-state latent ``z_t = argmax(a~ onehot(x0) + s~ eps)`` without
    the K noises (docs/math.md §2a), or the coupled pair ``(z_t, z_s)`` of two levels
    sharing the same eps (docs/math.md §2b, consistency distillation).

    ``x0``: ``[B, L]`` int64 or int32 ids in ``[0, vocab_size)`` (outputs in
    x0's dtype); ``gamma`` (and ``gamma_s``): Gaussian log-noise levels per row
    ``[B]`` / ``[B, 1]`` or per token ``[B, L]``, any float dtype (used in
    float64); -inf gives x0 and +inf the uniform law, NaN raises (module
    docstring, "Bad values"). Exact law:
    ``P(z_t = x0) = pt(gamma)`` (so ``alpha = gamma_to_alpha(gamma)[0]``),
    otherwise uniform over the other ids. O(1) work and no memory per token
    beyond the output. Randomness per ``duo_fast._random``: with ``seed`` the
    outputs are identical on CPU (any thread count) and CUDA, except where
    ``nu + eps_x`` and the max of the other noises tie to rounding.
    Not differentiable (integer outputs).
    """
    ids = token_ids(x0, "x0")
    check_vocab(vocab_size)
    g_t = per_token_level(gamma, "gamma", x0)
    g_s = None if gamma_s is None else per_token_level(gamma_s, "gamma_s", x0)
    key = philox_seed(x0.device, generator, seed)
    z_t, z_s = torch.ops.duo_fast.sample_zt.default(ids, g_t, g_s, vocab_size, key, 0)
    z_t, z_s = z_t.to(x0.dtype), z_s.to(x0.dtype)
    return z_t if gamma_s is None else (z_t, z_s)


@torch.library.register_fake("duo_fast::sample_zt")
def _sample_zt_fake(x0, gamma_t, gamma_s, vocab_size, seed, offset):
    z_s = x0.new_empty(x0.shape) if gamma_s is not None else x0.new_empty((0,))
    return x0.new_empty(x0.shape), z_s
