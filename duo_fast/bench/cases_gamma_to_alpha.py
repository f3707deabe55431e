"""Benchmark cases of duo_fast.gamma_to_alpha (docs/math.md §1).

BASELINES.md target: "gamma_to_alpha on 512 values <= 1% of the usdm_loss time"
(usdm_loss fwd+bwd, N=2048, K=50257, fp32 logits), negligible memory.

Rows:
  * 512 values (float64, float32) in the Duo training range, against the Duo
    code's schedule: DUO._gamma_to_alpha_dalpha_cached on a stand-in model whose
    integral_cache is what DUO._init_curriculum_cached loads from the Duo code's
    integral/gpt2.pkl (K = 50257): alpha by DUO._gamma_to_alphat_integral (nearest
    of 10^5 table points) and dalpha by its finite difference. Without the Duo
    code there is no table: the reference is then duo_fast.reference.gamma_to_alpha
    (scipy adaptive quadrature, ~1 ms per value; its per-value cache cleared
    before each call), and the table says so.
  * --full: 512 values in [-20, 20] (the Duo table clips gamma to its range
    [-5, -1], printing a line per call: its values outside are wrong).
  * the first call for a new K (builds the per-K table), in a fresh process.
  * the BASELINES target: 512 values against usdm_loss fwd+bwd measured in the
    same run (N=2048 in --full; N=256 in --quick, N=64 in --tiny), with the fused
    duo_fast.usdm_loss (carries the target) and with the Duo code's loss.
"""

from __future__ import annotations

import torch

import duo_fast
from duo_fast import reference as R
from duo_fast.reference.gamma_to_alpha import _pt_scalar

from . import duo_code
from .cases_usdm_loss import with_model
from .common import Case, Impl, Target

OP = "gamma_to_alpha"
K = 50257  # the Duo code's integral/gpt2.pkl
N_VALUES = 512
GAMMA_MIN, GAMMA_MAX = R.DUO_GAMMA_MIN, R.DUO_GAMMA_MAX  # Duo default training range
QUADRATURE = "duo_fast.reference (quadrature; no Duo code)"


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


def _schedule_source() -> str:
    ref = duo_code.reference()
    return ref.source if ref.integral_cache_path else QUADRATURE


def _ref_setup(dtype, lo=GAMMA_MIN, hi=GAMMA_MAX):
    base = _setup_values(dtype, lo, hi)

    def setup(device):
        st = base(device)
        ref = duo_code.reference()
        st["model"] = (ref.Model(K, device, integral_cache_path=ref.integral_cache_path)
                       if ref.integral_cache_path else None)
        return st

    return setup


def _ref(st):
    """The Duo code's alpha and dalpha (table lookup + finite difference); without
    its table, the quadrature of duo_fast.reference."""
    if st["model"] is not None:
        return st["model"]._gamma_to_alpha_dalpha_cached(st["gamma"])
    return R.gamma_to_alpha(st["gamma"], st["K"])


def _ref_clear(st):
    _pt_scalar.cache_clear()  # the quadrature memoizes per (gamma, K)


def _ref_impl(dtype, lo=GAMMA_MIN, hi=GAMMA_MAX, extra_note=""):
    return Impl(_ref, before_each=_ref_clear, setup=_ref_setup(dtype, lo, hi), source=_schedule_source, warmup=1,
                note="DUO._gamma_to_alpha_dalpha_cached (integral/gpt2.pkl table lookup + finite difference) on a "
                     "stand-in model; without the Duo code, duo_fast.reference's quadrature" + extra_note)


# ---- first call for a new K -------------------------------------------------------------


def _setup_new_k(device):
    return {"gamma": _gammas(N_VALUES, torch.float64, device), "K": None,
            "unseen": iter(range(K + 1, K + 10_000))}


def _next_k(st):
    st["K"] = next(st["unseen"])


# ---- usdm_loss fwd+bwd (the denominator of the BASELINES target) ------------------------


def _loss_shape(mode):
    return {"full": (2, 1024), "quick": (2, 128), "tiny": (1, 64)}[mode]  # N = 2048 (BASELINES) / 256 / 64


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
            "alpha": alpha.to(device=device, dtype=torch.float32)[:, None],
            "dalpha": dalpha.to(device=device, dtype=torch.float32)[:, None],
            "K": K,
        }

    return setup


def _drop_grad(st):
    st["logits"].grad = None


def _fused_loss(st):
    duo_fast.usdm_loss(st["logits"], st["z"], st["x0"], st["alpha"], st["dalpha"]).sum().backward()


def _duo_code_loss(st):
    duo_code.loss(st["model"], st["logits"], st["z"], st["x0"], st["alpha"], st["dalpha"]).sum().backward()


def cases(mode: str, device: str) -> list[Case]:
    full = mode == "full"
    rng = f"gamma in [{GAMMA_MIN}, {GAMMA_MAX}]"
    out = []
    for dt, tag in ((torch.float64, "f64"), (torch.float32, "f32")):
        out.append(Case(
            op=OP, name=f"{tag}-512", size=f"512 values {tag} K={K}, {rng}",
            setup=_setup_values(dt), duo=Impl(_duo, warmup=3), ref=_ref_impl(dt),
            notes=["no BASELINES target for this pair (the target is relative to the loss: see the vs-loss rows)"],
        ))
    if full:
        out.append(Case(
            op=OP, name="f64-512-wide", size=f"512 values f64 K={K}, gamma in [-20, 20]",
            setup=_setup_values(torch.float64, -20.0, 20.0), duo=Impl(_duo, warmup=3),
            ref=_ref_impl(torch.float64, -20.0, 20.0,
                          "; the Duo table clips gamma to [-5, -1] (wrong values outside, a printed line per call)"),
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
    target_text = "<= 1% of usdm_loss fwd+bwd (N=2048): speedup >= 100x; memory negligible (<= 1 MiB)"
    scale_note = ("" if full else f"; N={N} here, not the target's N=2048, so the ratio is pessimistic "
                  "(run --full for N=2048)")
    out.append(Case(
        op=OP, name="vs-fused-usdm_loss", size=f"512 values f64 vs duo_fast.usdm_loss fwd+bwd N={N} K={K} fp32",
        setup=_setup_loss(mode),
        duo=Impl(_duo, setup=_setup_values(torch.float64), warmup=3),
        ref=Impl(_fused_loss, before_each=_drop_grad, source="duo_fast",
                 note="this row's reference column is duo_fast.usdm_loss fwd+bwd (the fused loss)" + scale_note),
        target=Target(target_text, min_speedup_ref=100.0, max_mem_mib=1.0),
    ))
    out.append(Case(
        op=OP, name="vs-duo-code-loss", size=f"512 values f64 vs the Duo code's loss fwd+bwd N={N} K={K} fp32",
        setup=_setup_loss(mode),
        duo=Impl(_duo, setup=_setup_values(torch.float64), warmup=3),
        ref=Impl(_duo_code_loss, before_each=_drop_grad, setup=with_model(_setup_loss(mode)), source=duo_code.source,
                 note="this row's reference column is the Duo code's loss fwd+bwd (log_softmax + "
                      "DUO_BASE.nll_per_token), not a gamma_to_alpha reference" + scale_note),
        notes=["informational: the target is relative to the fused duo_fast.usdm_loss (row vs-fused-usdm_loss)"],
    ))
    return out
