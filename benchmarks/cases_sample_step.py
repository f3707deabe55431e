"""Benchmark cases of duo_fast.sample_step (SPEC section 4).

BASELINES.md target: "sample_step, N=2048, K=50257: >= 10x reference float64,
>= 3x compiled float32; peak extra memory O(N)". The BASELINES reference rows
are "ancestral step: posterior + categorical draw" in float32 and float64 (the
reference's default for sampling) and the float32 one under torch.compile.

Sides (each in a fresh process, see benchmarks/README.md):

  * duo:      duo_fast.sample_step(logits, z, alpha_t, alpha_s, seed=...).
  * ref:      `duo_step` below in float64: softmax of the float64 logits, the
              dense `_posterior_from_x0` ([N, K] temporaries as the Duo code has
              them), then trainer_base.sample_categorical (Gumbel-style race
              `argmax q / (1e-10 - log(U + 1e-10))` with float64 U).
  * compiled: torch.compile of `duo_step` in float32 (--full only; compile time
              in the warm-up call, not counted).

Rows: "ancestral" (alpha_t = 0.3, alpha_s = 0.6 per row: the model part of the
mixture gets ~43% of the mass, so ~43% of the rows run the inverse-CDF scan) at
every size; at K=50257 also "noise_removal" (alpha_t = 0.3, alpha_s = 1: ~100%
of the rows scan, the slowest case for duo_fast) and "top_p=0.9" (nucleus:
radix-select passes; the reference sorts each row). Logits ~ N(0, 2^2).

Sizes: --quick N=256 (B=1, L=256) x K=50257 and N=2048 x K=1024; --full N in
{2048, 8192} (L=1024) x K in {1024, 50257}. The float64 reference is left out
where its estimated peak exceeds the limit (N=8192, K=50257: ~19 GiB).

GB/s: duo_fast reads the logits twice (max, then the weight sum) plus part of a
row for the scan: counted as 2 * N * K * 4 bytes.
"""

from __future__ import annotations

import torch

import duo_fast

from .common import Case, Impl, Target, ref_limit_gib, token_sizes

OP = "sample_step"
SEED = 4242
TARGET_K = 50257
# Peak extra memory of the reference step in [N, K] tensors of its dtype's size
# (BASELINES: float64 4712 MiB = 5.7 x N*K*8 at N=2048, K=50257; float32 compiled
# 785 MiB = 2.0 x N*K*4), with margin.
REF_PEAK_UNITS = {"ref": 6.5 * 8, "compiled": 3.0 * 4}  # bytes per [N, K] entry
REF_LIMIT_GIB = {"cpu": 9.0, "cuda": 40.0}

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


def duo_step(logits, z, alpha_t, alpha_s, dtype):
    """The Duo code's ancestral step from logits: softmax (x0 = p), the dense
    _posterior_from_x0, sample_categorical. alpha_t, alpha_s: [B, 1]."""
    K = logits.shape[-1]
    p = logits.to(dtype).softmax(-1)
    at = alpha_t.to(dtype)[..., None]
    as_ = alpha_s.to(dtype)[..., None]
    onehot = torch.nn.functional.one_hot(z, K).to(dtype)
    p_z = p.gather(-1, z[..., None])
    num = (K * at * p_z * onehot + (at / as_ - at) * onehot + (as_ - at) * p + (1 - at / as_) * (1 - as_) / K)
    q = num / (K * at * p_z + 1 - at)
    gumbel_norm = 1e-10 - (torch.rand_like(q) + 1e-10).log()
    return (q / gumbel_norm).argmax(-1)


def duo_nucleus_step(logits, z, alpha_t, alpha_s, top_p, dtype):
    """utils.top_k_top_p_filtering on the logits (full sort per row), then duo_step."""
    sorted_logits, order = torch.sort(logits.to(dtype), descending=True, dim=-1)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()
    drop[..., 0] = False
    mask = drop.scatter(-1, order, drop)
    return duo_step(logits.to(dtype).masked_fill(mask, float("-inf")), z, alpha_t, alpha_s, dtype)


def _duo_fn(st):
    return duo_fast.sample_step(st["logits"], st["z"], st["alpha_t"], st["alpha_s"], top_p=st["top_p"], seed=SEED)


def _ref_fn(dtype):
    def fn(st):
        if st["top_p"] < 1.0:
            return duo_nucleus_step(st["logits"], st["z"], st["alpha_t"], st["alpha_s"], st["top_p"], dtype)
        return duo_step(st["logits"], st["z"], st["alpha_t"], st["alpha_s"], dtype)

    return fn


def cases(mode: str, device: str) -> list[Case]:
    full = mode == "full"
    limit = ref_limit_gib(device, cpu_gib=REF_LIMIT_GIB["cpu"])
    out = []
    for N, K in token_sizes(mode):
        B, L = _shape(N)
        for variant, kw in VARIANTS.items():
            if variant != "ancestral" and K != TARGET_K:
                continue
            notes = []
            ref = compiled = None
            est = REF_PEAK_UNITS["ref"] * N * K / 2**30
            if est <= limit:
                ref = Impl(_ref_fn(torch.float64), note="float64 Duo step: softmax, dense _posterior_from_x0, "
                           "sample_categorical (BASELINES' float64 row)")
            else:
                notes.append(f"{OP} {variant} N={N} K={K}: float64 reference not run: it would need ~{est:.1f} GiB "
                             f"> {limit:g} GiB here")
            if full:
                est_c = REF_PEAK_UNITS["compiled"] * N * K / 2**30
                if est_c <= limit:
                    compiled = Impl(_ref_fn(torch.float32), compile=True,
                                    note="torch.compile of the float32 Duo step (compile time not counted)")
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
