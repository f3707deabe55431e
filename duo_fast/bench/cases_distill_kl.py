"""Benchmark cases of duo_fast.distill_kl (docs/math.md §3, distillation KLs),
forward + backward w.r.t. the student logits.

No BASELINES.md target (informational rows: target "—").

Sides (each in a fresh process, see docs/benchmarks.md):

  * duo:      duo_fast.distill_kl(student, teacher, "bwd", inplace_grad=True).sum().backward()
              (student float32 requiring grad; .grad dropped before each call).
  * ref:      Distillation.nll's kl-bwd on logits: both through the Duo code's
              DUO_BASE._process_model_output (log_softmax; the teacher detached, as
              _teacher_logits returns it), then the KL expression that
              Distillation.nll writes inline, sum_j exp(ls_j) (ls_j - lt_j) (there
              is no Duo function for it to call); .sum().backward() (duo_code.kl_bwd).
  * compiled: torch.compile of the same fwd+bwd function (--full only; compile time
              is the warm-up call, not counted).

Sizes as cases_usdm_loss: --quick N=256 (B=1, L=256) x K=50257 and N=2048
(B=2, L=1024) x K=1024; --full N in {2048, 8192} x K in {1024, 50257}; --tiny
N=64 x K=1000; reference
sides whose estimated peak exceeds REF_LIMIT_GIB are left out (footnote).

Inputs: student, teacher ~ N(0, 1) float32, independent.

GB/s: duo_fast's three sweeps (both log-sum-exps, the KL, the gradient) read both
logits three times and write the gradient once: 7 * N * K * 4 bytes.

Every size at K=50257 also has a bf16 row (student and teacher bf16, read
natively; the gradient in bf16).
"""

from __future__ import annotations

import torch

import duo_fast

from . import duo_code
from .common import Case, Impl, ref_limit_gib, token_sizes

OP = "distill_kl"
DIRECTION = "bwd"
# Peak extra memory of the float32 reference fwd+bwd in units of one logits tensor's
# bytes (N*K*4), measured here at N=2048, K=50257: eager 5.0 (ls, lt, exp(ls),
# ls - lt, the gradients), compiled 1.0 (the gradient only); with some margin.
# Sides whose estimate exceeds the limit are not run.
REF_PEAK_UNITS = {"ref": 5.5, "compiled": 1.5}
REF_LIMIT_GIB = {"cpu": 9.0, "cuda": 40.0}


def _shape(N: int) -> tuple[int, int]:
    if N >= 1024:
        return N // 1024, 1024
    return 1, N


def _setup(N: int, K: int, dtype: torch.dtype = torch.float32):
    B, L = _shape(N)

    def setup(device):
        g = torch.Generator().manual_seed(3000 + N + K)
        student = torch.randn(B, L, K, generator=g, dtype=torch.float32).to(dtype)
        teacher = torch.randn(B, L, K, generator=g, dtype=torch.float32).to(dtype)
        return {"student": student.to(device).requires_grad_(True), "teacher": teacher.to(device)}

    return setup


def _ref_setup(N: int, K: int, dtype: torch.dtype = torch.float32):
    base = _setup(N, K, dtype)

    def setup(device):
        st = base(device)
        st["model"] = duo_code.reference().Model(K, device)
        return st

    return setup


def _drop_grad(st):
    st["student"].grad = None


def duo_fwd_bwd(st):
    duo_fast.distill_kl(st["student"], st["teacher"], DIRECTION, inplace_grad=True).sum().backward()


def ref_fwd_bwd(st):
    duo_code.kl_bwd(st["model"], st["student"], st["teacher"]).sum().backward()


def ref_peak_gib(N: int, K: int, side: str) -> float:
    return REF_PEAK_UNITS[side] * N * K * 4 / 2**30


def _bytes(st) -> int:
    # 3 reads of student and teacher + 1 gradient write, in the logits' dtype
    return 7 * st["student"].numel() * st["student"].element_size()


def cases(mode: str, device: str) -> list[Case]:
    full = mode == "full"
    limit = ref_limit_gib(device, cpu_gib=REF_LIMIT_GIB["cpu"])
    sizes = token_sizes(mode)
    out = []
    # bfloat16 logits (autocast training), read natively: the same sizes at K = 50257
    sized = [(N, K, torch.float32) for N, K in sizes] + [(N, K, torch.bfloat16) for N, K in sizes if K == 50257]
    for N, K, dtype in sized:
        B, L = _shape(N)
        tag, dname = ("-bf16", "bf16") if dtype == torch.bfloat16 else ("", "fp32")
        notes = []
        ref = compiled = None
        est = ref_peak_gib(N, K, "ref")
        if est <= limit:
            ref = Impl(ref_fwd_bwd, before_each=_drop_grad, setup=_ref_setup(N, K, dtype), source=duo_code.source,
                       note="Distillation.nll's kl-bwd: DUO_BASE._process_model_output (log_softmax) of both, "
                            "its inline sum exp(ls)(ls - lt), autograd backward")
        else:
            notes.append(f"{OP} N={N} K={K}: eager reference not run: it would need ~{est:.1f} GiB "
                         f"(~{REF_PEAK_UNITS['ref']:g} x one logits tensor) > {limit:g} GiB here")
        if full:
            est_c = ref_peak_gib(N, K, "compiled")
            if est_c <= limit:
                compiled = Impl(ref_fwd_bwd, before_each=_drop_grad, compile=True, setup=_ref_setup(N, K, dtype),
                                source=duo_code.source,
                                note="torch.compile of the same fwd+bwd function (compile time not counted)")
            else:
                notes.append(f"{OP} N={N} K={K}: compiled reference not run: it would need ~{est_c:.1f} GiB "
                             f"> {limit:g} GiB here")
        out.append(Case(
            op=OP, name=f"{DIRECTION}-fwd_bwd-N{N}-K{K}{tag}",
            size=f"KL(pS||pT) fwd+bwd N={N} (B={B}, L={L}) K={K} {dname}",
            setup=_setup(N, K, dtype),
            duo=Impl(duo_fwd_bwd, before_each=_drop_grad,
                     note=f'duo_fast.distill_kl(student, teacher, "{DIRECTION}", inplace_grad=True).sum().backward()'),
            ref=ref, compiled=compiled,
            bytes_moved=_bytes,
            target=None,
            notes=notes + ["no BASELINES target for distill_kl",
                           f"GB/s counts 3 reads of student and teacher + 1 write of the gradient ({dname})"],
        ))
    return out
