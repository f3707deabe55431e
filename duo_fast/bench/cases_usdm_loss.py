"""Benchmark cases of duo_fast.usdm_loss (docs/math.md §3), forward + backward.

BASELINES.md target: "usdm_loss fwd+bwd, N=2048, K=50257, fp32 logits: >= 8x
reference, >= 2.5x compiled; peak extra memory <= 1.1x the logits' bytes (the
gradient)". The BASELINES reference row is "log_softmax + ELBO loss, forward +
backward" (the Duo code run as is).

Sides (each in a fresh process, see docs/benchmarks.md):

  * duo:      duo_fast.usdm_loss(logits, z, x0, alpha, dalpha, inplace_grad=True)
              .sum().backward() (logits float32 requiring grad; .grad dropped
              before each call).
  * ref:      the Duo code's DUO_BASE._process_model_output (log_softmax, float32)
              and DUO_BASE.nll_per_token, called on a stand-in model
              (duo_code.loss; the eager copy where the Duo code is absent), then
              .sum().backward(). duo_fast.reference.usdm_loss (float64) is the
              accuracy oracle of the tests, not timed.
  * compiled: torch.compile of the same fwd+bwd function (--full and --tiny;
              compile time is the first warm-up call and is not counted).

Sizes: --quick N=256 (B=1, L=256) x K=50257 and N=2048 (B=2, L=1024) x K=1024;
--full N in {2048, 8192} (L=1024) x K in {1024, 50257}; --tiny N=64 x K=1000.
Every size at K=50257 also has a bf16 row (what autocast training produces:
bf16 logits read natively, gradient in bf16; target: peak <= 1.1x the bf16
logits' bytes; the reference runs on the same bf16 logits).
Reference sides whose estimated peak exceeds the limit (REF_PEAK_UNITS) are
left out, said in a footnote.

Inputs: alpha per batch row ([B, 1], float32, as DUO_BASE passes alpha_t) from
duo_fast.gamma_to_alpha on gamma uniform in the Duo training range;
dalpha = (gamma_max - gamma_min) * dalpha/dgamma < 0; z = x0 for about half the
tokens, a uniform random id otherwise; logits ~ N(0, 1).

GB/s: duo_fast's 3 sweeps over the row read the logits 3 times (log-sum-exp,
reductions, gradient) and write the gradient once: 4 * N * K * (4 or 2) bytes.
"""

from __future__ import annotations


import torch

import duo_fast
from duo_fast import reference as R

from . import duo_code
from .common import Case, Impl, Target, ref_limit_gib, token_sizes

OP = "usdm_loss"
GAMMA_MIN, GAMMA_MAX = R.DUO_GAMMA_MIN, R.DUO_GAMMA_MAX  # Duo default training range
TARGET_K = 50257
# Peak extra memory of the reference fwd+bwd, in units of the logits' bytes (N*K*4),
# measured at N=2048, K=50257: eager 5.0, compiled 4.0; with some margin.
REF_PEAK_UNITS = {"ref": 5.5, "compiled": 4.5}
MEM_TARGET = 1.1  # x the logits' bytes


def _shape(N: int) -> tuple[int, int]:
    if N >= 1024:
        return N // 1024, 1024  # Duo's sequence length
    return 1, N


def _setup(N: int, K: int, dtype: torch.dtype = torch.float32):
    B, L = _shape(N)

    def setup(device):
        g = torch.Generator().manual_seed(2000 + N + K)
        gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * torch.rand(B, generator=g, dtype=torch.float64)
        alpha, dalpha_dgamma = duo_fast.gamma_to_alpha(gamma, K)
        dalpha = (GAMMA_MAX - GAMMA_MIN) * dalpha_dgamma  # d alpha / d t < 0
        x0 = torch.randint(0, K, (B, L), generator=g)
        keep = torch.rand(B, L, generator=g) < 0.5
        z = torch.where(keep, x0, torch.randint(0, K, (B, L), generator=g))
        logits = torch.randn(B, L, K, generator=g, dtype=torch.float32).to(dtype)
        return {
            "logits": logits.to(device).requires_grad_(True),
            "z": z.to(device),
            "x0": x0.to(device),
            "alpha": alpha.to(device=device, dtype=torch.float32)[:, None],   # [B, 1]
            "dalpha": dalpha.to(device=device, dtype=torch.float32)[:, None],  # [B, 1]
            "K": K,
        }

    return setup


def with_model(setup, **model_kw):
    """setup, plus st["model"]: the reference's stand-in Duo model (vocab_size = st["K"])."""

    def wrapped(device):
        st = setup(device)
        st["model"] = duo_code.reference().Model(st["K"], device, **model_kw)
        return st

    return wrapped


def _drop_grad(st):
    st["logits"].grad = None


def duo_fwd_bwd(st):
    duo_fast.usdm_loss(st["logits"], st["z"], st["x0"], st["alpha"], st["dalpha"], inplace_grad=True).sum().backward()
    # the gradient stays in logits.grad until the next before_each: it is counted


def ref_fwd_bwd(st):
    duo_code.loss(st["model"], st["logits"], st["z"], st["x0"], st["alpha"], st["dalpha"]).sum().backward()


def ref_peak_gib(N: int, K: int, side: str) -> float:
    return REF_PEAK_UNITS[side] * N * K * 4 / 2**30


def _bytes(st) -> int:
    # 3 reads of the logits + 1 write of the gradient, in the logits' dtype
    return 4 * st["logits"].numel() * st["logits"].element_size()


REF_NOTE = ("DUO_BASE._process_model_output (log_softmax, float32) + DUO_BASE.nll_per_token on a stand-in model "
            "(vocab_size), autograd backward (BASELINES' 'log_softmax + ELBO loss, forward + backward')")
COMPILED_NOTE = "torch.compile of the same fwd+bwd function (compile time in the warm-up call: not counted)"


def cases(mode: str, device: str) -> list[Case]:
    compile_ = mode in ("full", "tiny")
    limit = ref_limit_gib(device)
    out = []
    sizes = [(N, K, torch.float32) for N, K in token_sizes(mode)]
    # bfloat16 logits (what autocast training produces), read natively: the same sizes at K = 50257
    sizes += [(N, K, torch.bfloat16) for N, K in token_sizes(mode) if K == TARGET_K]
    for N, K, dtype in sizes:
        B, L = _shape(N)
        bf16 = dtype == torch.bfloat16
        tag, dname = ("-bf16", "bf16") if bf16 else ("", "fp32")
        elt = 2 if bf16 else 4
        notes = []
        ref = compiled = None
        est = ref_peak_gib(N, K, "ref")
        if est <= limit:
            ref = Impl(ref_fwd_bwd, before_each=_drop_grad, note=REF_NOTE, setup=with_model(_setup(N, K, dtype)),
                       source=duo_code.source)
        else:
            notes.append(f"{OP} N={N} K={K}: reference not run: it would need ~{est:.1f} GiB "
                         f"(~{REF_PEAK_UNITS['ref']:g} x the logits' bytes) > {limit:g} GiB here")
        if compile_:
            est_c = ref_peak_gib(N, K, "compiled")
            if est_c <= limit:
                compiled = Impl(ref_fwd_bwd, before_each=_drop_grad, compile=True, note=COMPILED_NOTE,
                                setup=with_model(_setup(N, K, dtype)), source=duo_code.source)
            else:
                notes.append(f"{OP} N={N} K={K}: compiled reference not run: it would need ~{est_c:.1f} GiB "
                             f"> {limit:g} GiB here")
        logits_mib = N * K * elt / 2**20
        mem_mib = MEM_TARGET * logits_mib
        mem_text = f"peak <= 1.1x logits' bytes = {mem_mib:.0f} MiB"
        if K == TARGET_K and not bf16:
            conds = {}
            parts = []
            if ref is not None:
                conds["min_speedup_ref"] = 8.0
                parts.append(">= 8x reference")
            if compiled is not None:
                conds["min_speedup_compiled"] = 2.5
                parts.append(">= 2.5x compiled")
            else:
                parts.append("(2.5x compiled: --full)")
            target = Target("; ".join([", ".join(parts), mem_text]) if parts else mem_text,
                            max_mem_mib=mem_mib, **conds)
            if N != 2048:
                notes.append(f"the BASELINES usdm_loss target is stated at N=2048, K={TARGET_K}; "
                             f"N={N} is {'a quick proxy' if N < 2048 else 'an extra size'}")
        elif bf16:
            target = Target(f"{mem_text} (bf16 logits read natively, gradient in bf16; issue 12)", max_mem_mib=mem_mib)
        else:
            target = Target(f"{mem_text} (the speed target is for K={TARGET_K})", max_mem_mib=mem_mib)
        out.append(Case(
            op=OP, name=f"fwd_bwd-N{N}-K{K}{tag}",
            size=f"fwd+bwd N={N} (B={B}, L={L}) K={K} {dname}, alpha per row",
            setup=_setup(N, K, dtype),
            duo=Impl(duo_fwd_bwd, before_each=_drop_grad,
                     note="duo_fast.usdm_loss(..., inplace_grad=True).sum().backward() (gradient computed in the "
                          "forward call and handed to autograd)"),
            ref=ref, compiled=compiled,
            bytes_moved=_bytes,
            target=target,
            notes=notes + [f"GB/s counts 3 reads of the logits + 1 write of the gradient ({dname})"],
        ))
    return out
