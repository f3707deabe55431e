"""Benchmark cases of duo_fast.sample_zt (docs/math.md §2a, §2b).

BASELINES.md target: "sample_zt (single and coupled), same size [N=2048,
K=50257]: >= 1000x the dense reference; peak extra memory O(N)".

Rows (op "sample_zt"), each for the single latent z_t and for the coupled pair
(z_t, z_s) of the consistency distillation (both levels share the same noise):

  * duo_fast.sample_zt(x0, gamma, K, seed=...) /
    duo_fast.sample_zt(x0, gamma_t, K, gamma_s=gamma_s, seed=...)
  * against the Duo code's own dense draws (duo_code; the eager copy where the
    Duo code is absent), float32 gamma as its t is: single = argmax of
    DUO._q_xt_gaussian(F.one_hot(x0)) (the z_t of the simple curriculum);
    coupled = Distillation._sample_trajectory + two argmax (BASELINES'
    "distillation pair"). Each materializes [B, L, K] one-hot, float32 noise and
    the scaled sums (peak ~24 B per entry single, ~32 coupled);
  * where cheap (N=2048, K=1024), torch.compile of the same function.

Sizes: --full N = B*L in {2048, 8192} (L = 1024) x K in {1024, 50257}; the
reference side is left out where its estimated peak exceeds ~8 GiB (CPU):
N=8192, K=50257. --quick: N=256 (B=2, L=128), K=50257 and N=2048, K=1024;
--tiny N=64 x K=1000.

gamma (and gamma_s) per batch row ([B]), uniform in the Duo training range; for
the coupled pair the two draws of a row are sorted so that gamma_s <= gamma_t.

Targets: the BASELINES speed target (>= 1000x) is stated for K=50257, so the
K=50257 rows carry it (at N=2048 in --full; --quick's N=256 is a proxy); every
row carries the O(N) memory target: duo_fast's peak <= 4 * 8 * N bytes + 1 MiB.
"""

from __future__ import annotations

import torch

import duo_fast
from duo_fast import reference as R

from . import duo_code
from .common import Case, Impl, Target, ref_limit_gib, token_sizes

OP = "sample_zt"
GAMMA_MIN, GAMMA_MAX = R.DUO_GAMMA_MIN, R.DUO_GAMMA_MAX  # Duo default training range
SEED = 20240613
TARGET_K = 50257
# The dense reference's peak in bytes per [N, K] entry: int64 one-hot, float32 noise,
# a*onehot, s*eps and the sum (single); float32 one-hot, noise and both levels' sums
# (coupled); with margin.
REF_PEAK_UNITS = {False: 24, True: 32}
REF_LIMIT_GIB = {"cpu": 8.0, "cuda": 40.0}


def _shape(N: int) -> tuple[int, int]:
    if N >= 1024:
        return N // 1024, 1024  # Duo's sequence length
    return 2, N // 2


def ref_peak_gib(N: int, K: int, coupled: bool) -> float:
    """Estimated peak extra memory of the dense reference (GiB)."""
    return REF_PEAK_UNITS[coupled] * N * K / 2**30


def duo_mem_limit_mib(N: int) -> float:
    """O(N) bound on duo_fast's peak: 4 int64/float64 values per token + 1 MiB."""
    return 4 * 8 * N / 2**20 + 1.0


def _setup(N: int, K: int, coupled: bool):
    B, L = _shape(N)

    def setup(device):
        g = torch.Generator().manual_seed(1000 + N + K)
        x0 = torch.randint(0, K, (B, L), generator=g)
        lv = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * torch.rand(2, B, generator=g, dtype=torch.float64)
        lo, hi = lv.min(0).values, lv.max(0).values
        st = {
            "x0": x0.to(device),
            "gamma": (hi if coupled else lv[0]).to(device),   # gamma_t
            "gamma_s": lo.to(device) if coupled else None,    # gamma_s <= gamma_t
            "K": K,
        }
        return st

    return setup


def _duo_single(st):
    return duo_fast.sample_zt(st["x0"], st["gamma"], st["K"], seed=SEED)


def _duo_coupled(st):
    return duo_fast.sample_zt(st["x0"], st["gamma"], st["K"], gamma_s=st["gamma_s"], seed=SEED)


def _ref_setup(N: int, K: int, coupled: bool):
    """The inputs as float32 levels (the Duo code's gamma_t), and the stand-in Duo model."""
    base = _setup(N, K, coupled)

    def setup(device):
        st = base(device)
        st["gamma"] = st["gamma"].float()
        if coupled:
            st["gamma_s"] = st["gamma_s"].float()
        st["model"] = duo_code.reference().Model(K, device)
        return st

    return setup


def _ref_single(st):
    return duo_code.latent_argmax(st["model"], st["x0"], st["gamma"])


def _ref_coupled(st):
    return duo_code.trajectory_argmax(st["model"], st["x0"], st["gamma"], st["gamma_s"])


def _bytes(N: int, coupled: bool) -> int:
    # read x0, write z_t (and z_s): int64 each (gamma per row: negligible)
    return 8 * N * (3 if coupled else 2)


def cases(mode: str, device: str) -> list[Case]:
    limit = ref_limit_gib(device, cpu_gib=REF_LIMIT_GIB["cpu"])
    sizes = token_sizes(mode)
    rng = f"gamma per row in [{GAMMA_MIN}, {GAMMA_MAX}]"
    out = []
    for N, K in sizes:
        B, L = _shape(N)
        for coupled in (False, True):
            kind = "coupled" if coupled else "single"
            notes = []
            ref = compiled = None
            est = ref_peak_gib(N, K, coupled)
            fn = _ref_coupled if coupled else _ref_single
            what = ("Distillation._sample_trajectory + argmax of both levels" if coupled else
                    "argmax of DUO._q_xt_gaussian(F.one_hot(x0))")
            if est <= limit:
                ref = Impl(fn, setup=_ref_setup(N, K, coupled), source=duo_code.source,
                           note=f"{what} (dense [B, L, K] one-hot and float32 noise, as the Duo code)")
            else:
                notes.append(f"{OP} {kind} N={N} K={K}: reference side not run: the dense reference would "
                             f"need ~{est:.0f} GiB ({REF_PEAK_UNITS[coupled]} B per [N, K] entry) > {limit:g} GiB here")
            if N == 2048 and K == 1024:
                compiled = Impl(fn, compile=True, setup=_ref_setup(N, K, coupled), source=duo_code.source,
                                note=f"torch.compile of the same ({what}; compile time in the warm-up call: not counted)")
            mem_mib = duo_mem_limit_mib(N)
            mem_text = f"O(N): peak <= 4*8*N B + 1 MiB = {mem_mib:.2f} MiB"
            if K == TARGET_K:
                if ref is not None:
                    target = Target(f">= 1000x dense reference; {mem_text}",
                                    min_speedup_ref=1000.0, max_mem_mib=mem_mib)
                else:
                    target = Target(f"{mem_text} (speed: no reference here)", max_mem_mib=mem_mib)
                if N != 2048:
                    notes.append(f"the BASELINES sample_zt target is stated at N=2048, K={TARGET_K}; "
                                 f"N={N} is {'a quick proxy' if N < 2048 else 'an extra size'}")
            else:
                target = Target(f"{mem_text} (the 1000x speed target is for K={TARGET_K})", max_mem_mib=mem_mib)
            out.append(Case(
                op=OP, name=f"{kind}-N{N}-K{K}",
                size=f"{kind} N={N} (B={B}, L={L}) K={K}, {rng}",
                setup=_setup(N, K, coupled),
                duo=Impl(_duo_coupled if coupled else _duo_single, warmup=3,
                         note="duo_fast.sample_zt(..., seed=...) (O(1) per token, no [N, K] noise)"),
                ref=ref, compiled=compiled,
                bytes_moved=_bytes(N, coupled),
                target=target,
                notes=notes + ["GB/s counts reading x0 and writing z_t (and z_s), int64"],
            ))
    return out
