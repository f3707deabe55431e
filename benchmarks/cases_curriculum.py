"""Benchmark cases of the curriculum soft inputs (SPEC 2d, 2e):
duo_fast.curriculum_embed (exact, fwd+bwd w.r.t. the embedding),
duo_fast.curriculum_topk (sampling only) and duo_fast.curriculum_topk_embed
(fwd+bwd), d = 768.

BASELINES.md targets (N=2048, K=50257, d=768):
  * curriculum_embed fwd+bwd: >= 1.3x reference, peak <= 1/10 of reference;
  * curriculum_topk (k=128): >= 10x reference (at 1 and 2 threads), peak <= reference;
  * curriculum_topk_embed fwd+bwd (k=128): >= 2.5x reference, peak <= reference
    (both sides pay the dense [K, d] float32 embedding gradient, 147 MiB).

Reference sides, float32 eager re-implementations of the Duo code's paths:
  * `duo_simple_curriculum`: one-hot, randn noise [N, K], latent = a~ onehot +
    s~ noise, z = argmax, softmax(latent * inv_tau) @ E (the "simple" curriculum
    of Duo), then .sum().backward() w.r.t. E;
  * `duo_topk`: utils.sample_tempered_softmax_topk (float64 order statistics
    through ndtri of exp(cumsum), Floyd's algorithm for the ids, the reference's
    z rule), and for the embed rows the weighted bag (E[ids] * w).sum(-2) with
    autograd backward.
torch.compile of the dense curriculum is run in --full (compile time not counted).

Inputs: gamma per batch row uniform in the Duo training range [-3.5, -1.75];
inv_tau = 10 (a tempered input; the curriculum anneals tau); x0 uniform ids.
Sizes: --quick N=256 x K=50257 and N=2048 x K=1024; --full N in {2048, 8192}
x K in {1024, 50257}; k in {32, 128} for the top-k rows (k=128 carries the target).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import duo_fast
from duo_fast import reference as R

from .common import Case, Impl, Target, ref_limit_gib, token_sizes

TARGET_K = 50257
D = 768
INV_TAU = 10.0
SEED = 777
# Peak of the dense reference in [N, K] float32 tensors (one-hot, noise, latent,
# softmax, plus autograd's saved softmax and its gradient), with margin.
REF_PEAK_UNITS = 7.0


def _shape(N: int) -> tuple[int, int]:
    return (N // 1024, 1024) if N >= 1024 else (1, N)


def _setup(N: int, K: int, grad: bool):
    B, L = _shape(N)

    def setup(device):
        g = torch.Generator().manual_seed(SEED + N + K)
        gamma = R.DUO_GAMMA_MIN + (R.DUO_GAMMA_MAX - R.DUO_GAMMA_MIN) * torch.rand(B, generator=g, dtype=torch.float64)
        return {
            "x0": torch.randint(0, K, (B, L), generator=g).to(device),
            "gamma": gamma.to(device),
            "E": (0.02 * torch.randn(K, D, generator=g)).to(device).requires_grad_(grad),
            "K": K,
        }

    return setup


def duo_simple_curriculum(x0, gamma, inv_tau, E):
    """The Duo code's exact curriculum input in float32: [N, K] one-hot, noise,
    latent and softmax, then @ E."""
    K = E.shape[0]
    a = torch.sigmoid(-gamma).sqrt().float()[:, None, None]
    s = torch.sigmoid(gamma).sqrt().float()[:, None, None]
    latent = a * F.one_hot(x0, K).float() + s * torch.randn(*x0.shape, K, device=x0.device)
    z = latent.argmax(-1)
    return (latent * inv_tau).softmax(-1) @ E, z


def _sample_k_int(shape, k, max_value, device):
    """utils._sample_k_int (Floyd's algorithm, vectorized over tokens)."""
    out = torch.empty(*shape, k, dtype=torch.int64, device=device)
    for t, i in enumerate(range(max_value - k, max_value)):
        j = torch.randint(0, i + 1, shape, device=device)
        if t > 0:
            dup = (out[..., :t] == j[..., None]).any(dim=-1)
            out[..., t] = torch.where(dup, i, j)
        else:
            out[..., 0] = j
    return out


def duo_topk(x0, gamma, inv_tau, k, vocab_size):
    """utils.sample_tempered_softmax_topk: (weights, ids, z) as the Duo code."""
    alpha = torch.sigmoid(-gamma).sqrt().double()
    sigma = torch.sigmoid(gamma).sqrt().double()
    B, L = x0.shape
    log_u = torch.log(torch.rand(B, L, k, dtype=torch.float64, device=x0.device))
    div = torch.arange(vocab_size - 1, vocab_size - 1 - k, -1, dtype=torch.float64, device=x0.device)
    top = torch.special.ndtri(torch.exp(torch.cumsum(log_u / div, -1))) * sigma[:, None, None]
    extra = alpha[:, None] + torch.randn(B, L, dtype=torch.float64, device=x0.device) * sigma[:, None]
    in_top = extra > top[..., -1]
    top[..., -1] = torch.where(in_top, extra, top[..., -1])
    c = torch.where(in_top, top[..., -2], top[..., -1]) * inv_tau
    S = sigma[:, None] * inv_tau
    log_mu = S ** 2 / 2 + torch.special.log_ndtr((c - S ** 2) / S) - torch.special.log_ndtr(c / S)
    count = torch.where(in_top, vocab_size - k, vocab_size - k - 1).double()
    log_tail = torch.log(count) + log_mu
    log_top = top * inv_tau
    log_extra = torch.where(in_top, torch.full_like(log_tail, float("-inf")), extra * inv_tau)
    log_z = torch.logsumexp(torch.cat([log_top, log_tail[..., None], log_extra[..., None]], -1), -1, keepdim=True)
    w = torch.exp(log_top - log_z)
    ids = _sample_k_int((B, L), k, vocab_size - 1, x0.device)
    ids = ids + (ids >= x0[..., None]).long()
    ids[..., -1] = torch.where(in_top, x0, ids[..., -1])
    z = torch.where(in_top, x0, ids[..., 0])
    return w, ids, z


def _embed_duo(st):
    h, z = duo_fast.curriculum_embed(st["x0"], st["gamma"], INV_TAU, st["E"], seed=SEED)
    h.sum().backward()
    return z


def _embed_ref(st):
    h, z = duo_simple_curriculum(st["x0"], st["gamma"], INV_TAU, st["E"])
    h.sum().backward()
    return z


def _drop_grad(st):
    st["E"].grad = None


def _topk_duo(k):
    return lambda st: duo_fast.curriculum_topk(st["x0"], st["gamma"], INV_TAU, k, st["K"], seed=SEED)


def _topk_ref(k):
    return lambda st: duo_topk(st["x0"], st["gamma"], INV_TAU, k, st["K"])


def _topk_embed_duo(k):
    def fn(st):
        h, z = duo_fast.curriculum_topk_embed(st["x0"], st["gamma"], INV_TAU, k, st["E"], seed=SEED)
        h.sum().backward()
        return z

    return fn


def _topk_embed_ref(k):
    def fn(st):
        w, ids, z = duo_topk(st["x0"], st["gamma"], INV_TAU, k, st["K"])
        h = (st["E"][ids] * w.float()[..., None]).sum(-2)
        h.sum().backward()
        return z

    return fn


def cases(mode: str, device: str) -> list[Case]:
    full = mode == "full"
    limit = ref_limit_gib(device)
    out = []
    for N, K in token_sizes(mode):
        B, L = _shape(N)
        size = f"N={N} (B={B}, L={L}) K={K} d={D}"
        at_target = K == TARGET_K
        # exact curriculum input, fwd+bwd
        est = REF_PEAK_UNITS * N * K * 4 / 2**30
        notes = []
        ref = compiled = None
        if est <= limit:
            ref = Impl(_embed_ref, before_each=_drop_grad, note="float32 dense Duo curriculum (one-hot, noise, latent, "
                       "softmax @ E) + backward w.r.t. E")
            if full:
                compiled = Impl(_embed_ref, before_each=_drop_grad, compile=True,
                                note="torch.compile of the dense curriculum fwd+bwd (compile time not counted)")
        else:
            notes.append(f"curriculum_embed N={N} K={K}: reference not run (~{est:.1f} GiB > {limit:g} GiB)")
        target = Target(">= 1.3x reference, peak <= 1/10 of reference", min_speedup_ref=1.3, max_mem_ratio=0.1) \
            if at_target and ref is not None else None
        out.append(Case(op="curriculum_embed", name=f"fwd_bwd-N{N}-K{K}", size=f"fwd+bwd {size}, 1/tau={INV_TAU:g}",
                        setup=_setup(N, K, True),
                        duo=Impl(_embed_duo, before_each=_drop_grad,
                                 note="duo_fast.curriculum_embed(...)[0].sum().backward()"),
                        ref=ref, compiled=compiled, target=target, notes=notes))
        for k in (32, 128):
            tgt = Target(">= 10x reference, peak <= reference", min_speedup_ref=10.0, max_mem_ratio=1.0) \
                if at_target and k == 128 else None
            out.append(Case(op="curriculum_topk", name=f"k{k}-N{N}-K{K}", size=f"k={k} N={N} K={K}",
                            setup=_setup(N, K, False), duo=Impl(_topk_duo(k), note="duo_fast.curriculum_topk"),
                            ref=Impl(_topk_ref(k), note="utils.sample_tempered_softmax_topk (float64, Floyd ids)"),
                            target=tgt))
            tgt = Target(">= 2.5x reference, peak <= reference", min_speedup_ref=2.5, max_mem_ratio=1.0) \
                if at_target and k == 128 else None
            out.append(Case(op="curriculum_topk_embed", name=f"k{k}-N{N}-K{K}", size=f"fwd+bwd k={k} {size}",
                            setup=_setup(N, K, True),
                            duo=Impl(_topk_embed_duo(k), before_each=_drop_grad,
                                     note="duo_fast.curriculum_topk_embed(...)[0].sum().backward()"),
                            ref=Impl(_topk_embed_ref(k), before_each=_drop_grad,
                                     note="sample_tempered_softmax_topk + (E[ids] * w).sum(-2), autograd backward"),
                            target=tgt))
    return out
