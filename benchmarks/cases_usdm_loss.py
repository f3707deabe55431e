"""Benchmark cases of duo_fast.usdm_loss (SPEC section 3), forward + backward.

BASELINES.md target: "usdm_loss fwd+bwd, N=2048, K=50257, fp32 logits: >= 8x
reference, >= 2.5x compiled; peak extra memory <= 1.1x the logits' bytes (the
gradient)". The BASELINES reference row is "log_softmax + ELBO loss, forward +
backward" (the Duo code run as is: float32 logits, log_softmax in float32, then
DUO_BASE.nll_per_token, autograd backward).

Sides (each in a fresh process, see benchmarks/README.md):

  * duo:      duo_fast.usdm_loss(logits, z, x0, alpha, dalpha).sum().backward()
              (logits float32 requiring grad; .grad dropped before each call).
  * ref:      `duo_eager_loss` below: a float32 eager re-implementation of the Duo
              code's path -- log_softmax(logits) in float32, then SPEC section 3's
              formula with every [N, K] temporary materialized as
              DUO_BASE.nll_per_token does (exp, K*alpha*p, +1, -alpha, log, sum) --
              then .sum().backward(). This mirrors BASELINES.md's reference row.
              duo_fast.reference.usdm_loss (float64 math) is NOT the timed
              reference: it is slower than the Duo code (float64 [N, K] tensors);
              it is only the accuracy oracle (tests/).
  * compiled: torch.compile(the same fwd+bwd function) (--full only; compile time is
              the first warm-up call and is not counted; it compiles in well under
              2 min here).

Sizes: --quick N=256 (B=1, L=256) x K=50257 and N=2048 (B=2, L=1024) x K=1024;
--full N in {2048, 8192} (L=1024) x K in {1024, 50257}. The eager / compiled
reference sides are left out where their estimated peak extra memory exceeds
REF_LIMIT_GIB (see REF_PEAK_UNITS); said in a footnote.

Inputs: alpha per batch row ([B, 1], float32, as DUO_BASE passes alpha_t) from
duo_fast.gamma_to_alpha on gamma uniform in the Duo training range (so alpha in
(0, 1)); dalpha = (gamma_max - gamma_min) * dalpha/dgamma < 0 (d alpha / d t for
the linear gamma schedule); z = x0 for about half the tokens, a uniform random id
otherwise; logits ~ N(0, 1).

GB/s: duo_fast's 3 sweeps over the row read the logits 3 times (log-sum-exp,
reductions, gradient) and write the gradient once: 4 * N * K * 4 bytes.
"""

from __future__ import annotations

import functools

import torch

import duo_fast
from duo_fast import reference as R

from .common import Case, Impl, Target, ref_limit_gib, token_sizes

OP = "usdm_loss"
GAMMA_MIN, GAMMA_MAX = R.DUO_GAMMA_MIN, R.DUO_GAMMA_MAX  # Duo default training range
TARGET_K = 50257
# Peak extra memory of the eager float32 reference fwd+bwd, in units of the logits'
# bytes (N*K*4), measured here at N=2048, K=50257: eager 5.0 (1963 MiB, as BASELINES),
# compiled 4.0 (1570 MiB, as BASELINES); with some margin. Sides whose estimate
# exceeds the limit are not run.
REF_PEAK_UNITS = {"ref": 5.5, "compiled": 4.5}
REF_LIMIT_GIB = {"cpu": 9.0, "cuda": 40.0}
MEM_TARGET = 1.1  # x the logits' bytes


def _shape(N: int) -> tuple[int, int]:
    if N >= 1024:
        return N // 1024, 1024  # Duo's sequence length
    return 1, N


def _setup(N: int, K: int):
    B, L = _shape(N)

    def setup(device):
        g = torch.Generator().manual_seed(2000 + N + K)
        gamma = GAMMA_MIN + (GAMMA_MAX - GAMMA_MIN) * torch.rand(B, generator=g, dtype=torch.float64)
        alpha, dalpha_dgamma = duo_fast.gamma_to_alpha(gamma, K)
        dalpha = (GAMMA_MAX - GAMMA_MIN) * dalpha_dgamma  # d alpha / d t < 0
        x0 = torch.randint(0, K, (B, L), generator=g)
        keep = torch.rand(B, L, generator=g) < 0.5
        z = torch.where(keep, x0, torch.randint(0, K, (B, L), generator=g))
        logits = torch.randn(B, L, K, generator=g, dtype=torch.float32)
        return {
            "logits": logits.to(device).requires_grad_(True),
            "z": z.to(device),
            "x0": x0.to(device),
            "alpha": alpha.to(device=device, dtype=torch.float32)[:, None],   # [B, 1]
            "dalpha": dalpha.to(device=device, dtype=torch.float32)[:, None],  # [B, 1]
        }

    return setup


def duo_eager_loss(logits, z, x0, alpha, dalpha):
    """Float32 eager loss along the Duo code's path (SPEC section 3 on
    log_x_theta = log_softmax(logits)); alpha, dalpha [B, 1] (or [B, L]).

    Every [N, K] temporary is materialized as DUO_BASE.nll_per_token does:
    log_softmax, exp, K*alpha*p, +1, -alpha (the model marginal xb), log(xb), and
    the row sum of log(xb); the entries at z and x are gathered from xb.
    """
    K = logits.shape[-1]
    log_x_theta = logits.log_softmax(dim=-1)  # float32, as DUO_BASE._process_model_output
    a = alpha[:, :, None]
    p = log_x_theta.exp()
    xb = K * a * p + 1 - a                       # model's marginal at t, all j: [B, L, K]
    coeff = dalpha / (K * alpha)
    e = (x0 == z).float()
    ne = 1 - e
    xbar_z = (1 - alpha) + K * alpha * e         # true marginal at z
    xb_z = torch.gather(xb, -1, z.unsqueeze(-1)).squeeze(-1)
    xb_x = torch.gather(xb, -1, x0.unsqueeze(-1)).squeeze(-1)
    term1 = K * (1 / xbar_z - 1 / xb_z)
    c = (1 - alpha) / (K * alpha + 1 - alpha)
    A = e * c + ne
    offset = ((K - 1) * c * e - (1 / c) * ne) * c.log()
    S = xb.log().sum(-1)
    term2 = -A * (S - K * xb_z.log())
    term2 = term2 - K * alpha / (1 - alpha) * (xb_x.log() - xb_z.log()) * ne
    term2 = term2 + offset
    return coeff * (term1 - term2)


def _drop_grad(st):
    st["logits"].grad = None


def _fwd_bwd(loss_fn):
    def fn(st):
        loss = loss_fn(st["logits"], st["z"], st["x0"], st["alpha"], st["dalpha"])
        loss.sum().backward()
        # the gradient stays in logits.grad until the next before_each: it is counted

    return fn


duo_fwd_bwd = _fwd_bwd(functools.partial(duo_fast.usdm_loss, inplace_grad=True))
ref_fwd_bwd = _fwd_bwd(duo_eager_loss)


def ref_peak_gib(N: int, K: int, side: str) -> float:
    return REF_PEAK_UNITS[side] * N * K * 4 / 2**30


def _bytes(st) -> int:
    return 4 * st["logits"].numel() * 4  # 3 reads of the logits + 1 write of the gradient


REF_NOTE = ("float32 eager Duo path: log_softmax(logits) + SPEC 3 formula with the [N, K] temporaries "
            "of DUO_BASE.nll_per_token, autograd backward (mirrors BASELINES' 'log_softmax + ELBO loss, "
            "forward + backward'); duo_fast.reference.usdm_loss (float64) is the accuracy oracle, not timed")
COMPILED_NOTE = "torch.compile of the same fwd+bwd function (compile time in the warm-up call: not counted)"


def cases(mode: str, device: str) -> list[Case]:
    full = mode == "full"
    limit = ref_limit_gib(device, cpu_gib=REF_LIMIT_GIB["cpu"])
    sizes = token_sizes(mode)
    out = []
    for N, K in sizes:
        B, L = _shape(N)
        notes = []
        ref = compiled = None
        est = ref_peak_gib(N, K, "ref")
        if est <= limit:
            ref = Impl(ref_fwd_bwd, before_each=_drop_grad, note=REF_NOTE)
        else:
            notes.append(f"{OP} N={N} K={K}: eager reference not run: it would need ~{est:.1f} GiB "
                         f"(~{REF_PEAK_UNITS['ref']:g} x the logits' bytes) > {limit:g} GiB here")
        if full:
            est_c = ref_peak_gib(N, K, "compiled")
            if est_c <= limit:
                compiled = Impl(ref_fwd_bwd, before_each=_drop_grad, compile=True, note=COMPILED_NOTE)
            else:
                notes.append(f"{OP} N={N} K={K}: compiled reference not run: it would need ~{est_c:.1f} GiB "
                             f"> {limit:g} GiB here")
        logits_mib = N * K * 4 / 2**20
        mem_mib = MEM_TARGET * logits_mib
        mem_text = f"peak <= 1.1x logits' bytes = {mem_mib:.0f} MiB"
        if K == TARGET_K:
            conds = {}
            parts = []
            if ref is not None:
                conds["min_speedup_ref"] = 8.0
                parts.append(">= 8x reference")
            if compiled is not None:
                conds["min_speedup_compiled"] = 2.5
                parts.append(">= 2.5x compiled")
            elif not full:
                parts.append("(2.5x compiled: --full)")
            target = Target("; ".join([", ".join(parts), mem_text]) if parts else mem_text,
                            max_mem_mib=mem_mib, **conds)
            if N != 2048:
                notes.append(f"the BASELINES usdm_loss target is stated at N=2048, K={TARGET_K}; "
                             f"N={N} is {'a quick proxy' if N < 2048 else 'an extra size'}")
        else:
            target = Target(f"{mem_text} (the speed target is for K={TARGET_K})", max_mem_mib=mem_mib)
        out.append(Case(
            op=OP, name=f"fwd_bwd-N{N}-K{K}",
            size=f"fwd+bwd N={N} (B={B}, L={L}) K={K} fp32, alpha per row",
            setup=_setup(N, K),
            duo=Impl(duo_fwd_bwd, before_each=_drop_grad,
                     note="duo_fast.usdm_loss(..., inplace_grad=True).sum().backward() (gradient computed in the forward call and handed to autograd)"),
            ref=ref, compiled=compiled,
            bytes_moved=_bytes,
            target=target,
            notes=notes + ["GB/s counts 3 reads of the logits + 1 write of the gradient (fp32)"],
        ))
    return out
