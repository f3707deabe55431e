"""Benchmark cases of duo_fast.gamma_to_alpha (SPEC section 1).

BASELINES.md target: "gamma_to_alpha on 512 values <= 1% of the usdm_loss time"
(usdm_loss fwd+bwd, N=2048, K=50257, fp32 logits), negligible memory.

Rows:
  * 512 values (float64, float32) in the Duo training range, against the
    reference's way of getting alpha from gamma. The Duo code's table lookup
    (integral/<tokenizer>.pkl) is not available here, so the reference is
    duo_fast.reference.gamma_to_alpha (scipy adaptive quadrature, ~1.2 ms per
    value, lru-cached per value: the cache is cleared before every call). In
    --quick it is timed on 32 values and scaled x16 (said in the footnote).
  * the first call for a new K (builds the per-K table), in a fresh process.
  * the BASELINES target: 512 values against usdm_loss fwd+bwd measured in the
    same run. Until duo_fast.usdm_loss exists the denominator is the reference
    loss (duo_fast.reference.usdm_loss, float64 math, slower than the fused loss
    will be); once it exists the target row uses the fused loss automatically.
"""

from __future__ import annotations

import torch

import duo_fast
from duo_fast import reference as R

from .common import Case, Impl, Target

OP = "gamma_to_alpha"
K = 50257
N_VALUES = 512
REF_VALUES_QUICK = 32
GAMMA_MIN, GAMMA_MAX = R.DUO_GAMMA_MIN, R.DUO_GAMMA_MAX  # Duo default training range


def _gammas(n, dtype, device, lo=GAMMA_MIN, hi=GAMMA_MAX, seed=1234):
    g = torch.Generator().manual_seed(seed)
    v = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    return v.to(dtype=dtype, device=device)


def _setup_values(dtype, lo=GAMMA_MIN, hi=GAMMA_MAX):
    def setup(device):
        return {"gamma": _gammas(N_VALUES, dtype, device, lo, hi), "K": K}

    return setup


def _duo(st):
    return duo_fast.gamma_to_alpha(st["gamma"], st["K"])


def _ref_impl(n_ref):
    """Reference quadrature on the first n_ref of the 512 values, time scaled to 512."""

    def fn(st):
        return R.gamma_to_alpha(st["gamma"][:n_ref], st["K"])

    def clear(st):
        R._pt_scalar.cache_clear()  # the reference memoizes per (gamma, K)

    scale = N_VALUES / n_ref
    note = (
        "duo_fast.reference.gamma_to_alpha (scipy adaptive quadrature; the Duo code's "
        "table file is not available here), value cache cleared before each call"
        + (f"; timed on {n_ref} of the 512 values and scaled x{scale:g} (memory not scaled)"
           if n_ref != N_VALUES else "; all 512 values timed")
    )
    return Impl(fn, before_each=clear, scale=scale, note=note, warmup=1)


# ---- first call for a new K -------------------------------------------------------------


def _setup_new_k(device):
    return {"gamma": _gammas(N_VALUES, torch.float64, device), "K": None,
            "unseen": iter(range(K + 1, K + 10_000))}


def _next_k(st):
    st["K"] = next(st["unseen"])


# ---- usdm_loss fwd+bwd (the denominator of the BASELINES target) ------------------------


def _loss_shape(mode):
    return (2, 1024) if mode == "full" else (2, 128)  # N = 2048 (BASELINES) / 256 (quick)


def _setup_loss(mode):
    B, L = _loss_shape(mode)

    def setup(device):
        g = torch.Generator().manual_seed(7)
        gamma = _gammas(B, torch.float64, "cpu", seed=8)
        alpha, dalpha_dgamma = duo_fast.gamma_to_alpha(gamma, K)
        dalpha = (GAMMA_MAX - GAMMA_MIN) * dalpha_dgamma
        x0 = torch.randint(0, K, (B, L), generator=g)
        keep = torch.rand(B, L, generator=g, dtype=torch.float64) < alpha[:, None]
        z = torch.where(keep, x0, torch.randint(0, K, (B, L), generator=g))
        logits = torch.randn(B, L, K, generator=g, dtype=torch.float32)
        return {
            "logits": logits.to(device).requires_grad_(True),
            "z": z.to(device), "x0": x0.to(device),
            "alpha": alpha.to(device=device, dtype=torch.float32),
            "dalpha": dalpha.to(device=device, dtype=torch.float32),
        }

    return setup


def _drop_grad(st):
    st["logits"].grad = None


def _loss_fwd_bwd(loss_fn):
    def fn(st):
        loss = loss_fn(st["logits"], st["z"], st["x0"], st["alpha"], st["dalpha"])
        loss.sum().backward()
        # the gradient stays in logits.grad until the next before_each: it is counted

    return fn


def cases(mode: str, device: str) -> list[Case]:
    full = mode == "full"
    n_ref = N_VALUES if full else REF_VALUES_QUICK
    rng = f"gamma in [{GAMMA_MIN}, {GAMMA_MAX}]"
    out = []
    for dt, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
        out.append(Case(
            op=OP, name=f"{tag}-512", size=f"512 values {tag} K={K}, {rng}",
            setup=_setup_values(dt), duo=Impl(_duo, warmup=3), ref=_ref_impl(n_ref),
            notes=["no BASELINES target for this pair (the target is relative to the loss: see the usdm_loss row)"],
        ))
    if full:
        out.append(Case(
            op=OP, name="f64-512-wide", size=f"512 values f64 K={K}, gamma in [-20, 20]",
            setup=_setup_values(torch.float64, -20.0, 20.0), duo=Impl(_duo, warmup=3),
            ref=_ref_impl(n_ref),
        ))
    out.append(Case(
        op=OP, name="first-call-new-K", size=f"512 values f64, first call for a new K (~{K})",
        setup=_setup_new_k, duo=Impl(_duo, before_each=_next_k),
        notes=["first call with a K not seen before in the process (builds and caches the per-K "
               "table), fresh process: median over 5 unseen K after one warm-up K; the process's "
               "very first call (with lazy init) is first_call_ms in --json"],
    ))

    B, L = _loss_shape(mode)
    N = B * L
    size = f"512 values f64 vs loss fwd+bwd N={N} K={K} fp32"
    target_text = "<= 1% of usdm_loss fwd+bwd (N=2048): speedup >= 100x; memory negligible (<= 1 MiB)"
    fused = getattr(duo_fast, "usdm_loss", None)
    scale_note = ("" if full else
                  f"; --quick uses N={N}, 1/8 of the target's N=2048, so the ratio is ~8x pessimistic"
                  " (run --full for N=2048)")
    if fused is not None:
        out.append(Case(
            op=OP, name="vs-fused-usdm_loss", size=size, setup=_setup_loss(mode),
            duo=Impl(_duo, setup=_setup_values(torch.float64), warmup=3),
            ref=Impl(_loss_fwd_bwd(fused), before_each=_drop_grad,
                     note="this row's reference column is duo_fast.usdm_loss fwd+bwd (the fused loss)" + scale_note),
            target=Target(target_text, min_speedup_ref=100.0, max_mem_mib=1.0),
        ))
    out.append(Case(
        op=OP, name="vs-reference-usdm_loss", size=size.replace("vs loss", "vs ref loss"),
        setup=_setup_loss(mode),
        duo=Impl(_duo, setup=_setup_values(torch.float64), warmup=3),
        ref=Impl(_loss_fwd_bwd(R.usdm_loss), before_each=_drop_grad,
                 note=("this row's reference column is duo_fast.reference.usdm_loss fwd+bwd (float64 math "
                       "on fp32 logits), not a gamma_to_alpha reference" + scale_note)),
        target=(None if fused is not None else
                Target(target_text + " [vs reference loss until duo_fast.usdm_loss exists]",
                       min_speedup_ref=100.0, max_mem_mib=1.0)),
        notes=["the target is relative to the fused duo_fast.usdm_loss, which will be >= 8x faster than "
               "this reference loss: against this denominator the target means a speedup >= ~800x"],
    ))
    return out
