"""linear_sample_step: the reverse-process step from hidden states through the
output layer, chunk by chunk of rows, so that the [N, K] logits never exist; with
the Duo code's classifier-free guidance (docs/math.md §4; docs/linear_ops.md)."""

from __future__ import annotations

import math

import torch

from .. import _C  # noqa: F401  (loads the library: registers torch.ops.duo_fast.*)
from .._checks import check_real, check_same_device, check_tensor, token_ids
from .._random import philox_seed
from ._common import _check_ids_like
from ._linear_chunks import (ChunkBuffers, balanced_rows, check_chunk_size, check_linear, chunks, default_chunk_size, flat_rows,
                             kernel_logits)
from .sample_step import _step_levels

# The Duo code's stand-in for log 0 in the guided combination (trainer_base's
# neg_infinity): a finite value, so a row whose every entry is masked is uniform.
_GUIDED_LOG_ZERO = -1000000.0


def _check_guidance(guidance, hidden: torch.Tensor):
    """(uncond_hidden, guid_weight as a float), or None."""
    if guidance is None:
        return None
    if not isinstance(guidance, (tuple, list)) or len(guidance) != 2:
        raise TypeError(f"duo_fast: guidance must be a pair (uncond_hidden, guid_weight), got {type(guidance).__name__}")
    uncond, weight = guidance
    check_tensor(uncond, "guidance[0] (uncond_hidden)")
    if tuple(uncond.shape) != tuple(hidden.shape):
        raise ValueError(f"duo_fast: guidance[0] (uncond_hidden) has shape {tuple(uncond.shape)}, expected hidden's "
                         f"shape {tuple(hidden.shape)}")
    if uncond.dtype != hidden.dtype:
        raise TypeError(f"duo_fast: guidance[0] (uncond_hidden) has dtype {uncond.dtype}, expected hidden's {hidden.dtype}")
    check_same_device(("hidden", hidden), ("guidance[0] (uncond_hidden)", uncond))
    w = check_real(weight, "guidance[1] (guid_weight)", -math.inf, math.inf, lo_open=True, hi_open=True)
    return uncond, w


def _guided_log_posterior(cond, uncond, z, a_t, a_s, temperature, top_p, guid_weight):
    """log of trainer_base._get_guided_posterior_from_xt's law, up to a per-row
    constant (float64 [C, K]): gamma log q_cond + (1 - gamma) log q_uncond, the
    Duo code's -1e6 where either posterior is 0, each q the posterior of one
    model's logits (duo_fast.posterior: temperature and top_p per model)."""
    qc = torch.ops.duo_fast.posterior.default(cond, z, a_t, a_s, 1.0, temperature, top_p)
    qu = torch.ops.duo_fast.posterior.default(uncond, z, a_t, a_s, 1.0, temperature, top_p)
    zero = (qc == 0) | (qu == 0)
    log_q = qc.double().log_().mul_(guid_weight)
    del qc
    log_q.add_(qu.double().log_(), alpha=1.0 - guid_weight)
    del qu
    return log_q.masked_fill_(zero, _GUIDED_LOG_ZERO)


def _softmax_(log_q: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension, in place (float64)."""
    log_q.sub_(log_q.amax(-1, keepdim=True)).exp_()
    return log_q.div_(log_q.sum(-1, keepdim=True))


def _guided_chunk_logits(cond, uncond, z, a_t, a_s, kappa, temperature, top_p, guid_weight):
    """Log-weights [C, K] (float32, max 0 per row) of the guided reverse step of a
    chunk, as _ancestral_update / _psi_update form it with guidance:
        q = guided(alpha_s)                                                     (kappa = 1)
        q = kappa guided(alpha_s) + (1 - kappa) (alpha_s guided(1) + (1 - alpha_s) / K)   (Psi)
    with guided(a) = softmax(_guided_log_posterior(..., a)). Drawn from by
    sample_step with alpha_t = 0, alpha_s = 1: then its mixture is the model part
    alone, p = softmax(these log-weights) = q."""
    log_q = _guided_log_posterior(cond, uncond, z, a_t, a_s, temperature, top_p, guid_weight)
    if kappa != 1.0:
        q = _softmax_(log_q).mul_(kappa)
        q1 = _softmax_(_guided_log_posterior(cond, uncond, z, a_t, torch.ones_like(a_s), temperature, top_p,
                                             guid_weight))
        as_ = a_s.unsqueeze(-1)
        q.add_(q1.mul_(as_).add_((1.0 - as_) / q.shape[-1]), alpha=1.0 - kappa)
        del q1
        log_q = q.log_()
    return log_q.sub_(log_q.amax(-1, keepdim=True)).float()


def _draw_rows(hidden, weight, bias, z, a_t, a_s, kappa, temperature, top_p, key, guidance, chunk_size):
    """z_s [N] (int64) chunk by chunk: rows [s, e) are drawn by sample_step with
    row_offset=s, i.e. from the Philox streams s..e-1 that the same call on all N
    rows gives them (stream = token index; sample_step.h)."""
    h2, zf, atf, asf = flat_rows(hidden), z.reshape(-1), a_t.reshape(-1), a_s.reshape(-1)
    u2 = flat_rows(guidance[0]) if guidance is not None else None
    out = torch.empty_like(zf)
    with torch.no_grad():  # integer outputs: no graph for the chunks' logits
        bufs = ChunkBuffers(balanced_rows(zf.shape[0], chunk_size) if guidance is None else 0)
        for s, e in chunks(zf.shape[0], chunk_size, balanced=True):
            out[s:e] = _draw_chunk(h2, u2, weight, bias, zf, atf, asf, kappa, temperature, top_p, key, guidance, s, e,
                                   bufs)
    return out


def _draw_chunk(h2, u2, weight, bias, zf, atf, asf, kappa, temperature, top_p, key, guidance, s, e, bufs):
    """z_s of rows [s, e) (see _draw_rows; ``bufs``: the call's ChunkBuffers, which
    reuse no buffer under guidance: there the chunk's logits feed float64 work
    several times their size)."""
    step = torch.ops.duo_fast.sample_step.default
    logits = kernel_logits(bufs.linear("logits", h2[s:e], weight, bias))
    if guidance is None:
        return step(logits, zf[s:e], atf[s:e], asf[s:e], kappa, temperature, top_p, key, 0, s)
    uncond = kernel_logits(torch.nn.functional.linear(u2[s:e], weight, bias))
    lw = _guided_chunk_logits(logits, uncond, zf[s:e], atf[s:e], asf[s:e], kappa, temperature, top_p, guidance[1])
    del logits, uncond
    # alpha_t = 0, alpha_s = 1: the draw is from softmax(lw) alone (see _guided_chunk_logits)
    return step(lw, zf[s:e], torch.zeros_like(atf[s:e]), torch.ones_like(asf[s:e]), 1.0, 1.0, 1.0, key, 0, s)


def linear_sample_step(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    alpha_t,
    alpha_s,
    *,
    kappa: float = 1.0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    guidance: tuple[torch.Tensor, float] | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """:func:`sample_step` on the logits ``hidden @ weight.T + bias`` without
    forming them: rows (tokens) are processed in chunks of at most
    ``chunk_size`` (default: ~64 MiB of float32 logits per chunk; an eighth of
    that with ``guidance``), as many as that needs and of (nearly) equal size,
    each chunk's logits made by one GEMM and drawn from by the sample_step
    kernel. Peak extra memory O(chunk_size * K), independent of N.

    ``hidden``: ``[..., d]``; ``weight``: ``[K, d]``; ``bias``: ``[K]`` or None;
    ``z``, ``alpha_t``, ``alpha_s``, ``kappa`` (Psi mix), ``temperature``,
    ``top_p``, ``generator``, ``seed``: as :func:`sample_step`. The logits are
    formed in hidden's dtype (float32 / bfloat16 / float16 read natively,
    float64 read as float32).

    Exact: every row's law is sample_step's, and with the same seed (or the same
    generator state) the tokens are those of ``sample_step(hidden @ weight.T +
    bias, z, ...)``: the Philox key is drawn once per call and each chunk of rows
    ``[s, e)`` is drawn from the streams ``s..e-1`` that the full call gives them
    (identical wherever the chunked GEMM gives the rows the same bits as the
    full one, which BLAS does on rows; otherwise it is a rounding difference of
    the logits). The nucleus (``top_p < 1``) is a per-row quantity, so chunking
    rows keeps it exact too.

    ``guidance=(uncond_hidden, guid_weight)``: classifier-free guidance as the
    Duo code's ``sampling.guid_weight`` (``trainer_base._get_guided_posterior_
    from_xt``): ``uncond_hidden`` (hidden's shape and dtype) are the hidden
    states of the unconditional pass, through the same output layer; with
    ``q_c``, ``q_u`` the posteriors of the conditional and unconditional logits
    (each with ``temperature`` and ``top_p``, as the Duo code filters each
    model's output), the step draws from ``softmax(g log q_c + (1 - g) log
    q_u)`` (``g = guid_weight``, -1e6 in place of the log where either
    posterior is 0, as the Duo code does; a row where every entry is masked is
    uniform), and for ``kappa < 1`` from ``kappa guided(alpha_s) + (1 - kappa)
    (alpha_s guided(1) + (1 - alpha_s) / K)`` (``_psi_update``). ``g = 1`` is the
    conditional step and ``g = 0`` the unconditional one (the Duo code's two
    special cases: the same draws as without guidance on hidden resp.
    uncond_hidden). The posteriors are float32 (``duo_fast.posterior``) and
    combined in float64: entries below float32's range (~1e-38) of either
    posterior count as 0, like the Duo code with ``sampling.use_float64=False``.

    Bad values: levels and scalars as :func:`sample_step` (raise). A row of the
    logits with NaN, +inf or no finite entry (NaN / inf in hidden, weight or
    bias) raises, naming those logits and the row (CUDA: as sample_step, the
    next duo_fast CUDA call raises). Not differentiable (integer outputs).
    """
    K = check_linear(hidden, weight, bias)
    ids = token_ids(z, "z")
    _check_ids_like(hidden, "hidden", ids)
    a_t, a_s, kappa, temperature, top_p = _step_levels(ids, alpha_t, alpha_s, kappa, temperature, top_p)
    guided = _check_guidance(guidance, hidden)
    if guided is not None and guided[1] in (0.0, 1.0):  # the Duo code's special cases: one model alone
        hidden, guided = (hidden if guided[1] == 1.0 else guided[0]), None
    if chunk_size is None and guided is not None:  # ~8x the memory per row: two models' logits and posteriors, float64
        chunk_size = max(1, default_chunk_size(K, weight.shape[1]) // 8)
    chunk_size = check_chunk_size(chunk_size, K, weight.shape[1])
    key = philox_seed(hidden.device, generator, seed)

    def draw():
        return _draw_rows(hidden, weight, bias, ids, a_t, a_s, kappa, temperature, top_p, key, guided, chunk_size)

    if torch.compiler.is_compiling():
        return draw().view(z.shape).to(z.dtype)
    try:
        out = draw()
    except RuntimeError as err:
        if "no probability distribution" not in str(err):
            raise
        raise RuntimeError(f"duo_fast: linear_sample_step: the logits hidden @ weight.T + bias"
                           f"{' (or uncond_hidden @ weight.T + bias)' if guided is not None else ''}: {err}") from None
    return out.view(z.shape).to(z.dtype)
