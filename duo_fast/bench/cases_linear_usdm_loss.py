"""Benchmark cases of duo_fast.linear_usdm_loss (docs/math.md §3: fused linear + loss),
forward + backward w.r.t. hidden, weight and bias, d = 768.

Issue 5 asks it "against hidden @ W.T + b followed by the reference loss,
showing memory independent of N". Sides (fresh process each):

  * duo: duo_fast.linear_usdm_loss(hidden, W, b, z, x0, alpha, dalpha, reduction="sum").backward()
    (tokens in chunks of ~64 MiB of float32 logits; the gradients computed chunk by chunk
    in the forward, scaled by grad_output in backward: one logits GEMM per chunk);
  * ref: logits = hidden @ W.T + b, then the Duo code's loss (DUO_BASE._process_model_output
    and DUO_BASE.nll_per_token on a stand-in model, duo_code.loss), .sum().backward().

Both sides hold the parameter gradients (W: K*d*4 bytes = 147 MiB at K=50257, d=768).
The memory target is the point of the op: duo_fast's peak extra memory must not grow
with N -- each row carries a bound computed from the chunk size (one chunk's logits + gradient + the parameter
gradients + O(N d) activations), and the table shows it flat across N.
Sizes: --quick N in {256, 1024} x K=50257; --full N in {512, 2048, 8192} x K=50257
(the reference is left out where it would need more than ~9 GiB); --tiny N=64, K=1000, d=64.
"""

from __future__ import annotations

import torch

import duo_fast
from duo_fast import reference as R
from duo_fast.ops._linear_chunks import default_chunk_size

from . import duo_code
from .cases_usdm_loss import with_model
from .common import Case, Impl, Target, ref_limit_gib

OP = "linear_usdm_loss"
D = 768
K = 50257
REF_PEAK_UNITS = 5.5  # x the logits' bytes, as the eager usdm_loss reference


def _setup(N: int, K: int = K, D: int = D):
    B, L = (N // 256, 256) if N >= 256 else (1, N)

    def setup(device):
        g = torch.Generator().manual_seed(3000 + N)
        gamma = R.DUO_GAMMA_MIN + (R.DUO_GAMMA_MAX - R.DUO_GAMMA_MIN) * torch.rand(B, generator=g, dtype=torch.float64)
        alpha, dalpha_dgamma = duo_fast.gamma_to_alpha(gamma, K)
        x0 = torch.randint(0, K, (B, L), generator=g)
        z = torch.where(torch.rand(B, L, generator=g) < 0.5, x0, torch.randint(0, K, (B, L), generator=g))
        return {
            "hidden": torch.randn(B, L, D, generator=g).to(device).requires_grad_(True),
            "W": (0.02 * torch.randn(K, D, generator=g)).to(device).requires_grad_(True),
            "b": torch.zeros(K).to(device).requires_grad_(True),
            "z": z.to(device), "x0": x0.to(device),
            "alpha": alpha.float()[:, None].to(device),
            "dalpha": ((R.DUO_GAMMA_MAX - R.DUO_GAMMA_MIN) * dalpha_dgamma).float()[:, None].to(device),
            "K": K,
        }

    return setup


def _drop_grads(st):
    for name in ("hidden", "W", "b"):
        st[name].grad = None


def _duo(st):
    duo_fast.linear_usdm_loss(st["hidden"], st["W"], st["b"], st["z"], st["x0"], st["alpha"], st["dalpha"],
                              reduction="sum").backward()


def _ref(st):
    logits = st["hidden"] @ st["W"].T + st["b"]
    duo_code.loss(st["model"], logits, st["z"], st["x0"], st["alpha"], st["dalpha"]).sum().backward()


def _duo_peak_bound_mib(N: int, K: int = K, D: int = D, chunk_units: int = 3) -> float:
    """Bound of a fused linear op's peak (cases_linear_distill_kl too): chunk_units
    float32 [chunk, K] tensors live at once, plus the parameter gradients and O(N d)."""
    chunk = default_chunk_size(K, D)
    per_chunk = chunk_units * chunk * K * 4  # here: logits, their gradient, and the GEMM's output of a chunk
    params = 2 * (K * D + K) * 4  # parameter gradients and a chunk's grad_weight product
    activations = 4 * N * D * 4  # grad_hidden and the per-chunk slices
    return (per_chunk + params + activations) / 2**20 * 1.1 + 8


def linear_sizes(mode: str, device: str, ref_peak_units: float):
    """(N, K, d, the reference's estimated peak GiB, the limit it must stay under) of the
    fused linear ops' cases (cases_linear_distill_kl too): d = 768 at GPT-2's K, tiny
    sizes in --tiny."""
    k, d = (1000, 64) if mode == "tiny" else (K, D)
    limit = ref_limit_gib(device)
    for N in {"full": [512, 2048, 8192], "quick": [256, 1024], "tiny": [64]}[mode]:
        yield N, k, d, ref_peak_units * N * k * 4 / 2**30 + 0.3, limit


def cases(mode: str, device: str) -> list[Case]:
    out = []
    for N, k, d, est, limit in linear_sizes(mode, device, REF_PEAK_UNITS):
        notes = []
        ref = Impl(_ref, before_each=_drop_grads, setup=with_model(_setup(N, k, d)), source=duo_code.source,
                   note="hidden @ W.T + b, then the Duo code's loss (log_softmax + DUO_BASE.nll_per_token), autograd") \
            if est <= limit else None
        if ref is None:
            notes.append(f"{OP} N={N}: reference not run (~{est:.1f} GiB > {limit:g} GiB)")
        bound = _duo_peak_bound_mib(N, k, d)
        out.append(Case(
            op=OP, name=f"fwd_bwd-N{N}-K{k}", size=f"fwd+bwd N={N} K={k} d={d} fp32",
            setup=_setup(N, k, d),
            duo=Impl(_duo, before_each=_drop_grads, note=f"duo_fast.linear_usdm_loss(..., reduction='sum') (chunk {default_chunk_size(k, d)} tokens)"),
            ref=ref,
            target=Target(f"peak O(chunk*K + K*d), independent of N: <= {bound:.0f} MiB", max_mem_mib=bound),
            notes=notes,
        ))
    return out
