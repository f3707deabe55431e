"""Benchmark cases of duo_fast.linear_distill_kl (docs/math.md §3: the distillation KL fused
with the output layers of the student and the teacher), forward + backward
w.r.t. the student's hidden, weight and bias, d = 768 (student and teacher).

Sides (fresh process each):

  * duo: duo_fast.linear_distill_kl(hidden, W, b, t_hidden, t_W, t_b, "bwd", reduction="sum").backward()
    (tokens in chunks of ~64 MiB of float32 logits; the gradients computed chunk by chunk
    in the forward; the teacher's chunk logits under no_grad);
  * ref: student logits = hidden @ W.T + b, teacher logits = t_hidden @ t_W.T + t_b under
    no_grad, then Distillation.nll's kl-bwd on them (duo_code.kl_bwd:
    DUO_BASE._process_model_output of both, its inline sum exp(ls)(ls - lt)),
    .sum().backward().

Both sides hold the student's parameter gradients (147 MiB at K=50257, d=768). The
memory target is the point of the op: duo_fast's peak must not grow with N (a bound
from the chunk size: a chunk's student and teacher logits, the kernel's gradient and
a GEMM output, the parameter gradients, O(N d) activations).
Sizes: --quick N in {256, 1024} x K=50257; --full N in {512, 2048, 8192} x K=50257
(the reference left out where it would need more than ~9 GiB); --tiny N=64, K=1000, d=64.
"""

from __future__ import annotations

import torch

import duo_fast
from duo_fast.ops._linear_chunks import default_chunk_size

from . import duo_code
from .cases_linear_usdm_loss import D, K, _drop_grads, _duo_peak_bound_mib, linear_sizes
from .cases_linear_usdm_loss import _setup as _student_setup
from .cases_usdm_loss import with_model
from .common import Case, Impl, Target

OP = "linear_distill_kl"
DIRECTION = "bwd"
# The eager reference's peak in units of one [N, K] float32 tensor: student and teacher
# logits, both log_softmax, exp, the product, the gradients (as cases_distill_kl, 5.5) + the GEMMs'.
REF_PEAK_UNITS = 7.0


def _setup(N: int, K: int = K, D: int = D):
    student = _student_setup(N, K, D)

    def setup(device):
        st = student(device)
        B, L = st["z"].shape
        g = torch.Generator().manual_seed(4000 + N)
        st["t_hidden"] = torch.randn(B, L, D, generator=g).to(device)
        st["t_W"] = (0.02 * torch.randn(K, D, generator=g)).to(device)
        st["t_b"] = (0.1 * torch.randn(K, generator=g)).to(device)
        return st

    return setup


def _duo(st):
    duo_fast.linear_distill_kl(st["hidden"], st["W"], st["b"], st["t_hidden"], st["t_W"], st["t_b"], DIRECTION,
                               reduction="sum").backward()


def _ref(st):
    student = st["hidden"] @ st["W"].T + st["b"]
    with torch.no_grad():
        teacher = st["t_hidden"] @ st["t_W"].T + st["t_b"]
    duo_code.kl_bwd(st["model"], student, teacher).sum().backward()


def cases(mode: str, device: str) -> list[Case]:
    out = []
    for N, k, d, est, limit in linear_sizes(mode, device, REF_PEAK_UNITS):
        notes = []
        ref = Impl(_ref, before_each=_drop_grads, setup=with_model(_setup(N, k, d)), source=duo_code.source,
                   note="student hidden @ W.T + b, teacher's under no_grad, then Distillation.nll's kl-bwd "
                        "(log_softmax of both, sum exp(ls)(ls - lt)), autograd") if est <= limit else None
        if ref is None:
            notes.append(f"{OP} N={N}: reference not run (~{est:.1f} GiB > {limit:g} GiB)")
        bound = _duo_peak_bound_mib(N, k, d, chunk_units=4)
        out.append(Case(
            op=OP, name=f"{DIRECTION}-fwd_bwd-N{N}-K{k}", size=f"KL(pS||pT) fwd+bwd N={N} K={k} d={d} fp32",
            setup=_setup(N, k, d),
            duo=Impl(_duo, before_each=_drop_grads,
                     note=f"duo_fast.linear_distill_kl(..., '{DIRECTION}', reduction='sum') "
                          f"(chunk {default_chunk_size(k, d)} tokens)"),
            ref=ref,
            target=Target(f"peak O(chunk*K + K*d), independent of N: <= {bound:.0f} MiB", max_mem_mib=bound),
            notes=notes + ["no BASELINES target for linear_distill_kl (issue 22: no [N, K] logits)"],
        ))
    return out
