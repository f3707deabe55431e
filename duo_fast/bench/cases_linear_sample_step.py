"""Benchmark cases of duo_fast.linear_sample_step (docs/math.md §4: the reverse-process
step fused with the output layer), d = 768.

Sides (fresh process each):

  * duo: duo_fast.linear_sample_step(hidden, W, b, z, alpha_t, alpha_s, top_p=..., seed=...)
    (tokens in chunks of ~64 MiB of float32 logits, each drawn by the sample_step kernel);
  * ref: logits = hidden @ W.T + b, then the Duo code's own `_ancestral_update` on them
    (as cases_sample_step: `_get_ancestral_posterior`, `_get_posterior_from_xt` with the
    float64 cast of `sampling.use_float64=True`, its default, `utils.top_k_top_p_filtering`
    for top_p < 1, the dense `DUO_BASE._posterior_from_x0`, `sample_categorical`).

Rows: "ancestral" (alpha_t = 0.3, alpha_s = 0.6) and "top_p=0.9" (nucleus). Inputs:
hidden ~ N(0, 1), W ~ N(0, 4 / d) (logits ~ N(0, 2^2), as cases_sample_step), b ~ N(0, 0.1^2).
The memory target is the point of the op: peak O(chunk * K), independent of N.
Sizes: --quick N in {256, 1024} x K=50257; --full N in {512, 2048, 8192}; --tiny N=64,
K=1000, d=64; the float64 reference is left out where its estimated peak exceeds the limit.
"""

from __future__ import annotations

import torch

import duo_fast
from duo_fast.ops._linear_chunks import default_chunk_size

from . import duo_code
from .cases_linear_usdm_loss import D, K
from .cases_sample_step import REF_PEAK_UNITS, _shape
from .common import Case, Impl, Target, ref_limit_gib

OP = "linear_sample_step"
SEED = 4343
VARIANTS = {"ancestral": 1.0, "top_p=0.9": 0.9}  # top_p


def _setup(N: int, K: int, D: int, top_p: float):
    B, L = _shape(N)

    def setup(device):
        g = torch.Generator().manual_seed(SEED + N + K)
        return {
            "hidden": torch.randn(B, L, D, generator=g).to(device),
            "W": (2.0 / D**0.5 * torch.randn(K, D, generator=g)).to(device),
            "b": (0.1 * torch.randn(K, generator=g)).to(device),
            "z": torch.randint(0, K, (B, L), generator=g).to(device),
            "alpha_t": torch.full((B, 1), 0.3, dtype=torch.float64, device=device),
            "alpha_s": torch.full((B, 1), 0.6, dtype=torch.float64, device=device),
            "top_p": top_p,
        }

    return setup


def _ref_setup(N: int, K: int, D: int, top_p: float):
    """The inputs and the stand-in Duo model (use_float64=True, p_nucleus=top_p);
    alpha_t, alpha_s float32 [B, 1] as the Duo code's schedule gives them."""
    base = _setup(N, K, D, top_p)

    def setup(device):
        st = base(device)
        st["model"] = duo_code.reference().Model(K, device, use_float64=True, p_nucleus=top_p)
        st["alpha_t"], st["alpha_s"] = st["alpha_t"].float(), st["alpha_s"].float()
        return st

    return setup


def _duo(st):
    return duo_fast.linear_sample_step(st["hidden"], st["W"], st["b"], st["z"], st["alpha_t"], st["alpha_s"],
                                       top_p=st["top_p"], seed=SEED)


def _ref(st):
    model = st["model"]
    model.logits = st["hidden"] @ st["W"].T + st["b"]  # the model's output layer, then its forward's log_softmax
    try:
        return duo_code.ancestral_step(model, st["z"], st["alpha_t"], st["alpha_s"])
    finally:
        model.logits = None


def cases(mode: str, device: str) -> list[Case]:
    sizes = {"full": [512, 2048, 8192], "quick": [256, 1024], "tiny": [64]}[mode]
    k, d = (1000, 64) if mode == "tiny" else (K, D)
    limit = ref_limit_gib(device)
    chunk = default_chunk_size(k, d)
    out = []
    for N in sizes:
        B, L = _shape(N)
        for variant, top_p in VARIANTS.items():
            est = REF_PEAK_UNITS["ref"] * N * k / 2**30
            notes = []
            ref = Impl(_ref, setup=_ref_setup(N, k, d, top_p), source=duo_code.source,
                       note="hidden @ W.T + b, then the Duo code's _ancestral_update, float64 "
                            "(sampling.use_float64=True, its default): log_softmax, dense "
                            "_posterior_from_x0, sample_categorical") if est <= limit else None
            if ref is None:
                notes.append(f"{OP} {variant} N={N}: float64 reference not run (~{est:.1f} GiB > {limit:g} GiB)")
            # a chunk's logits (GEMM output), the kernel's per-thread scratch rows, z_s and the levels
            bound = (1.2 * chunk * k * 4 + 3 * 8 * N + 4 * k * 4) / 2**20 + 8.0
            out.append(Case(
                op=OP, name=f"{variant}-N{N}-K{k}", size=f"{variant} N={N} (B={B}, L={L}) K={k} d={d} fp32",
                setup=_setup(N, k, d, top_p),
                duo=Impl(_duo, note=f"duo_fast.linear_sample_step(..., top_p=..., seed=...) (chunk {chunk} tokens)"),
                ref=ref,
                target=Target(f"peak O(chunk*K), independent of N: <= {bound:.0f} MiB", max_mem_mib=bound),
                notes=notes + ["no BASELINES target for linear_sample_step (issue 22: no [N, K] logits)"],
            ))
    return out
