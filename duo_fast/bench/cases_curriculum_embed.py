"""Benchmark cases of the exact curriculum soft input (docs/math.md §2c, §2d):
duo_fast.curriculum_embed (fwd+bwd w.r.t. the embedding), d = 768; the setup
shared with the top-k cases (cases_curriculum_topk.py).

Target (N=2048, K=50257, d=768; docs/benchmarks.md): curriculum_embed fwd+bwd
>= 1.3x reference, peak <= 1/10 of reference.

Reference side: the Duo code's own functions (duo_code; the eager copy where
the Duo code is absent), on float32 gamma as DUO.nll has it: DUO.nll's simple
branch: F.one_hot(x0), DUO._q_xt_gaussian on a stand-in model, * 1/tau, argmax
(z_t), and models.dit.EmbeddingLayer.forward of the latent (softmax, einsum with
the embedding); .sum().backward() w.r.t. the layer's embedding. torch.compile of
the simple curriculum is run in --full (compile time not counted).

Inputs: gamma per batch row uniform in the Duo training range [-3.5, -1.75];
inv_tau = 10 (a tempered input; the curriculum anneals tau); x0 uniform ids.
Sizes: --quick N=256 x K=50257 and N=2048 x K=1024; --full N in {2048, 8192}
x K in {1024, 50257}; --tiny N=64 x K=1000, d=64.
"""

from __future__ import annotations

import torch

import duo_fast
from duo_fast import reference as R

from . import duo_code
from .common import Case, Impl, Target, ref_limit_gib, token_sizes

TARGET_K = 50257
D = 768
INV_TAU = 10.0
SEED = 777
# Peak of the dense reference in [N, K] float32 tensors (one-hot int64, noise, latent,
# softmax, plus autograd's saved softmax and its gradient), with margin.
REF_PEAK_UNITS = 7.0


def _shape(N: int) -> tuple[int, int]:
    return (N // 1024, 1024) if N >= 1024 else (1, N)


def _dim(mode: str) -> int:
    return 64 if mode == "tiny" else D


def _setup(N: int, K: int, d: int, grad: bool, ref: bool = False):
    """Inputs; with ref=True also the reference's stand-in Duo model and its
    EmbeddingLayer holding the same embedding (st["E"] is then the layer's
    parameter, so both sides drop and fill the same kind of .grad)."""
    B, L = _shape(N)

    def setup(device):
        g = torch.Generator().manual_seed(SEED + N + K)
        gamma = R.DUO_GAMMA_MIN + (R.DUO_GAMMA_MAX - R.DUO_GAMMA_MIN) * torch.rand(B, generator=g, dtype=torch.float64)
        st = {
            "x0": torch.randint(0, K, (B, L), generator=g).to(device),
            "gamma": gamma.to(device),
            "gamma32": gamma.float().to(device),  # DUO.nll's gamma_t (float32 t)
            "E": (0.02 * torch.randn(K, d, generator=g)).to(device).requires_grad_(grad),
            "K": K,
        }
        if ref:
            impl = duo_code.reference()
            st["model"] = impl.Model(K, device)
            st["layer"] = impl.EmbeddingLayer(st["E"].detach())
            st["layer"].embedding.requires_grad_(grad)
            st["E"] = st["layer"].embedding
        return st

    return setup


def _drop_grad(st):
    st["E"].grad = None


# ---- exact ("simple") curriculum -------------------------------------------------------


def _embed_duo(st):
    h, z = duo_fast.curriculum_embed(st["x0"], st["gamma"], INV_TAU, st["E"], seed=SEED)
    h.sum().backward()
    return z


def _embed_ref(st):
    h, z = duo_code.simple_curriculum(st["model"], st["layer"], st["x0"], st["gamma32"], INV_TAU)
    h.sum().backward()
    return z


# ---- top-k ------------------------------------------------------------------------------


def sizes(mode: str):
    """(N, K, d, size label, at the target's K) of the curriculum cases of a mode."""
    d = _dim(mode)
    for N, K in token_sizes(mode):
        B, L = _shape(N)
        yield N, K, d, f"N={N} (B={B}, L={L}) K={K} d={d}", K == TARGET_K


def cases(mode: str, device: str) -> list[Case]:
    full = mode == "full"
    limit = ref_limit_gib(device)
    src = duo_code.source
    out = []
    for N, K, d, size, at_target in sizes(mode):
        # exact curriculum input, fwd+bwd
        est = REF_PEAK_UNITS * N * K * 4 / 2**30
        notes = []
        ref = compiled = None
        if est <= limit:
            ref = Impl(_embed_ref, before_each=_drop_grad, setup=_setup(N, K, d, True, ref=True), source=src,
                       note="DUO.nll's simple curriculum: one-hot, DUO._q_xt_gaussian, * 1/tau, argmax, "
                            "EmbeddingLayer.forward (softmax @ E); backward w.r.t. E")
            if full:
                compiled = Impl(_embed_ref, before_each=_drop_grad, compile=True, setup=_setup(N, K, d, True, ref=True),
                                source=src, note="torch.compile of the simple curriculum fwd+bwd (compile time not counted)")
        else:
            notes.append(f"curriculum_embed N={N} K={K}: reference not run (~{est:.1f} GiB > {limit:g} GiB)")
        target = Target(">= 1.3x reference, peak <= 1/10 of reference", min_speedup_ref=1.3, max_mem_ratio=0.1) \
            if at_target and ref is not None else None
        out.append(Case(op="curriculum_embed", name=f"fwd_bwd-N{N}-K{K}", size=f"fwd+bwd {size}, 1/tau={INV_TAU:g}",
                        setup=_setup(N, K, d, True),
                        duo=Impl(_embed_duo, before_each=_drop_grad,
                                 note="duo_fast.curriculum_embed(...)[0].sum().backward()"),
                        ref=ref, compiled=compiled, target=target, notes=notes))
    return out
