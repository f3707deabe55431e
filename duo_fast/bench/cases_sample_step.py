"""Benchmark cases of duo_fast.sample_step (docs/math.md §4).

BASELINES.md target: "sample_step, N=2048, K=50257: >= 10x reference float64,
>= 3x compiled float32; peak extra memory O(N)". The BASELINES reference rows
are "ancestral step: posterior + categorical draw" in float32 and float64 (the
reference's default for sampling) and the float32 one under torch.compile.

Sides (each in a fresh process, see docs/benchmarks.md):

  * duo:      duo_fast.sample_step(logits, z, alpha_t, alpha_s, top_p=..., seed=...).
  * ref:      the Duo code's own `_ancestral_update` on a stand-in model whose
              forward returns `_process_model_output(logits)` (log_softmax) in place
              of the backbone's: `_get_ancestral_posterior`, `_get_posterior_from_xt`
              (float64 cast as `sampling.use_float64=True`, its default;
              `utils.top_k_top_p_filtering` when p_nucleus < 1), the dense
              `DUO_BASE._posterior_from_x0` and `trainer_base.sample_categorical`
              (duo_code.ancestral_step; the eager copy where the Duo code is absent).
              Its schedule is the Duo code's LogLinear with eps = 0, t = 1 - alpha_t.
  * compiled: torch.compile of the same step with `use_float64=False` (--full only;
              compile time in the warm-up call, not counted).

Rows: "ancestral" (alpha_t = 0.3, alpha_s = 0.6 per row: the model part of the
mixture gets ~43% of the mass, so ~43% of the rows run the inverse-CDF scan) at
every size; at K=50257 also "noise_removal" (`noise_removal_step=True`, alpha_s
= 1: ~100% of the rows scan, the slowest case for duo_fast) and "top_p=0.9"
(nucleus: radix-select passes; the reference sorts each row). Logits ~ N(0, 2^2).

Sizes: --quick N=256 (B=1, L=256) x K=50257 and N=2048 x K=1024; --full N in
{2048, 8192} (L=1024) x K in {1024, 50257}; --tiny N=64 x K=1000. The float64
reference is left out where its estimated peak exceeds the limit.

GB/s: duo_fast reads the logits twice (max, then the weight sum) plus part of a
row for the scan: counted as 2 * N * K * 4 bytes.
"""

from __future__ import annotations

import torch

import duo_fast

from . import duo_code
from .common import Case, Impl, Target, ref_limit_gib, token_sizes

OP = "sample_step"
SEED = 4242
TARGET_K = 50257
# Peak extra memory of the reference step in bytes per [N, K] entry (BASELINES: float64
# 4712 MiB = 5.7 x N*K*8 at N=2048, K=50257; float32 compiled 785 MiB = 2.0 x N*K*4),
# with margin.
REF_PEAK_UNITS = {"ref": 6.5 * 8, "compiled": 3.0 * 4}

VARIANTS = {
    "ancestral": dict(alpha_s=0.6, top_p=1.0),
    "noise_removal": dict(alpha_s=1.0, top_p=1.0),
    "top_p=0.9": dict(alpha_s=0.6, top_p=0.9),
}


def _shape(N: int) -> tuple[int, int]:
    return (N // 1024, 1024) if N >= 1024 else (1, N)


def _setup(N: int, K: int, alpha_s: float, top_p: float):
    B, L = _shape(N)

    def setup(device):
        g = torch.Generator().manual_seed(SEED + N + K)
        return {
            "logits": (2.0 * torch.randn(B, L, K, generator=g)).to(device),
            "z": torch.randint(0, K, (B, L), generator=g).to(device),
            "alpha_t": torch.full((B, 1), 0.3, dtype=torch.float64, device=device),
            "alpha_s": torch.full((B, 1), alpha_s, dtype=torch.float64, device=device),
            "top_p": top_p,
        }

    return setup


def _duo_fn(st):
    return duo_fast.sample_step(st["logits"], st["z"], st["alpha_t"], st["alpha_s"], top_p=st["top_p"], seed=SEED)


def _ref_setup(N: int, K: int, alpha_s: float, top_p: float, use_float64: bool):
    """The inputs, and the stand-in Duo model holding the logits; alpha_t, alpha_s
    float32 [B, 1] as the Duo code's schedule gives them."""
    base = _setup(N, K, alpha_s, top_p)

    def setup(device):
        st = base(device)
        st["model"] = duo_code.reference().Model(K, device, use_float64=use_float64, p_nucleus=top_p,
                                                 logits=st["logits"])
        st["alpha_t"] = st["alpha_t"].float()
        st["alpha_s"] = st["alpha_s"].float()
        return st

    return setup


def _ref_fn(noise_removal: bool):
    def fn(st):
        return duo_code.ancestral_step(st["model"], st["z"], st["alpha_t"], st["alpha_s"], noise_removal)

    return fn


def cases(mode: str, device: str) -> list[Case]:
    full = mode == "full"
    limit = ref_limit_gib(device)
    out = []
    for N, K in token_sizes(mode):
        B, L = _shape(N)
        for variant, kw in VARIANTS.items():
            if variant != "ancestral" and K != TARGET_K:
                continue
            notes = []
            ref = compiled = None
            est = REF_PEAK_UNITS["ref"] * N * K / 2**30
            nr = variant == "noise_removal"
            if est <= limit:
                ref = Impl(_ref_fn(nr), setup=_ref_setup(N, K, kw["alpha_s"], kw["top_p"], True),
                           source=duo_code.source,
                           note="the Duo code's _ancestral_update, float64 (sampling.use_float64=True, its default): "
                                "log_softmax, dense _posterior_from_x0, sample_categorical (BASELINES' float64 row)")
            else:
                notes.append(f"{OP} {variant} N={N} K={K}: float64 reference not run: it would need ~{est:.1f} GiB "
                             f"> {limit:g} GiB here")
            if full:
                est_c = REF_PEAK_UNITS["compiled"] * N * K / 2**30
                if est_c <= limit:
                    compiled = Impl(_ref_fn(nr), compile=True, setup=_ref_setup(N, K, kw["alpha_s"], kw["top_p"], False),
                                    source=duo_code.source,
                                    note="torch.compile of the Duo code's _ancestral_update in float32 "
                                         "(use_float64=False; compile time not counted)")
            mem_mib = (3 * 8 * N + 2 * K * 4) / 2**20 + 2.0  # z_s, the float64 levels, scratch rows
            mem_text = f"peak O(N): <= {mem_mib:.1f} MiB"
            if K == TARGET_K and variant == "ancestral":
                conds, parts = {}, []
                if ref is not None:
                    conds["min_speedup_ref"] = 10.0
                    parts.append(">= 10x float64 reference")
                if compiled is not None:
                    conds["min_speedup_compiled"] = 3.0
                    parts.append(">= 3x compiled float32")
                elif not full:
                    parts.append("(3x compiled: --full)")
                target = Target(", ".join(parts + [mem_text]), max_mem_mib=mem_mib, **conds)
                if N != 2048:
                    notes.append(f"the BASELINES sample_step target is stated at N=2048, K={TARGET_K}; "
                                 f"N={N} is {'a quick proxy' if N < 2048 else 'an extra size'}")
            else:
                target = Target(f"{mem_text} (speed target: ancestral at K={TARGET_K})", max_mem_mib=mem_mib)
            out.append(Case(
                op=OP, name=f"{variant}-N{N}-K{K}",
                size=f"{variant} N={N} (B={B}, L={L}) K={K} fp32",
                setup=_setup(N, K, kw["alpha_s"], kw["top_p"]),
                duo=Impl(_duo_fn, note="duo_fast.sample_step(logits, z, alpha_t, alpha_s, top_p=..., seed=...)"),
                ref=ref, compiled=compiled,
                bytes_moved=lambda st: 2 * st["logits"].numel() * 4,
                target=target,
                notes=notes + ["GB/s counts 2 reads of the fp32 logits (max, weight sum); the scan is extra"],
            ))
    return out
